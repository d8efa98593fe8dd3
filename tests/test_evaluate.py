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


def test_window_nll_is_each_window_own_cross_entropy_and_the_record_keeps_it():
    from layercut.config import EvalOptions
    from layercut.evaluate import compare_measures, evaluate, window_nll

    model = build_tiny("llama")
    windows = random_ids(batch=5, length=12, seed=4)
    with torch.no_grad():
        losses = [model(input_ids=window[None], labels=window[None]).loss.item() for window in windows]
    found = window_nll(model, windows, batch_size=2)
    assert found.shape == (5,) and torch.allclose(found, torch.tensor(losses, dtype=torch.float64), rtol=1e-5)
    measured = evaluate(model, None, windows, EvalOptions(), batch_size=3)
    assert measured.window_nll == found.tolist()
    assert math.isclose(measured.perplexity, math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    metrics = compare_measures(measured, measured, 4, 3, test_windows=windows)
    assert metrics.perplexity.window_nll_before == metrics.perplexity.window_nll_after == found.tolist()


def test_paired_perplexity_ties_a_model_with_itself_and_separates_a_cut():
    from layercut.evaluate import window_nll
    from layercut.layers import drop_layers
    from layercut.paired import log_perplexity_difference

    model = build_tiny("llama", layers=4)
    windows = random_ids(batch=16, length=16, seed=5)
    dense = window_nll(model, windows).numpy()
    same = log_perplexity_difference(window_nll(model, windows).numpy(), dense)
    assert (same.low, same.high) == (0.0, 0.0) and same.tie
    drop_layers(model, [(0, 2)])
    cut = log_perplexity_difference(window_nll(model, windows).numpy(), dense)
    assert not cut.tie and cut.estimate != 0.0

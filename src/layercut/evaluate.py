"""Perplexity under the standard protocol: non-overlapping windows of a fixed length over a test text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layercut.load import model_device


def batches(windows: torch.Tensor, batch_size: int):
    """Yield ``[b, T]`` slices of ``windows`` ``[N, T]`` in order."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``input_ids`` ``[b, T]`` under ``logits`` ``[b, T, V]``.

    Position t predicts token t + 1, so a window of T tokens scores T - 1 tokens. Computed in float32.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> float:
    """exp(mean next-token cross-entropy) over ``windows`` ``[N, T]`` (N·(T−1) predicted tokens).

    ``progress`` is an optional callable taking the number of windows done, for progress bars.
    """
    device = model_device(model)
    total, count = 0.0, 0
    for batch in batches(windows, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += token_nll(logits, batch).item()
        count += batch.shape[0] * (batch.shape[1] - 1)
        if progress is not None:
            progress(batch.shape[0])
    return math.exp(total / count)

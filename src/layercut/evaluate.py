"""Perplexity under the standard protocol: non-overlapping windows of a fixed length over a test text."""

from __future__ import annotations

import math
import time

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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(model, batch_size: int = 1, prompt_tokens: int = 256, new_tokens: int = 64, repeats: int = 3,
               seed: int = 0) -> dict[str, float]:
    """Prefill and decode speed in tokens per second on the model's device, after one warm-up round.

    Prefill: a forward pass over ``[batch_size, prompt_tokens]`` random tokens. Decode: greedy ``generate`` of
    ``new_tokens`` more tokens with the KV cache; its time minus the prefill time, per generated token. The best
    of ``repeats`` rounds is kept (least disturbed by other work).
    """
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    ones = torch.ones_like(prompt)
    kwargs = {"attention_mask": ones, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                  "use_cache": True, "pad_token_id": 0}
    prefill_times, generate_times = [], []
    for round_ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=prompt, attention_mask=ones, use_cache=True)
        _synchronize(device)
        middle = time.perf_counter()
        model.generate(prompt, **kwargs)
        _synchronize(device)
        end = time.perf_counter()
        if round_:  # round 0 warms up kernels and caches
            prefill_times.append(middle - start)
            generate_times.append(end - middle)
    prefill = min(prefill_times)
    decode = max(min(generate_times) - prefill, 1e-9)
    return {"prefill_tokens_per_s": batch_size * prompt_tokens / prefill,
            "decode_tokens_per_s": batch_size * new_tokens / decode,
            "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}

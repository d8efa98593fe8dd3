"""The evaluate stage: perplexity on non-overlapping windows of held-out text, zero-shot accuracy through lm-eval
(:mod:`layercut.zeroshot`), prefill and decode speed; and the comparison of a dense and a pruned evaluation."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from layercut.errors import LayercutError
from layercut.forward import batches, model_device
from layercut.record import Measures, Metrics, PerplexityRecord, Speed, SpeedComparison, ZeroShotComparison

if TYPE_CHECKING:
    from layercut.config import EvalOptions


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``input_ids`` ``[b, T]`` under ``logits`` ``[b, T, V]``.

    Position t predicts token t + 1, so a window of T tokens scores T - 1 tokens. Computed in float32.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window of ``windows`` ``[N, T]`` (over its T − 1
    predicted tokens), ``[N]`` float64 on the CPU. ``progress`` (optional) is called with the windows done."""
    device = model_device(model)
    found = []
    for batch in batches(windows, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none")
        found.append(nll.sum(dim=1).double().cpu() / (batch.shape[1] - 1))
        if progress is not None:
            progress(batch.shape[0])
    return torch.cat(found)


def perplexity_of(nll: torch.Tensor, finite: bool = True) -> float:
    """exp of the mean of per-window mean NLLs ``[N]`` (windows of one length). A perplexity that is not finite
    raises LayercutError unless ``finite`` is False (then it is returned: inf or nan)."""
    mean = nll.mean().item()
    value = math.inf if mean > 700 else math.exp(mean)  # exp overflows a float above ~709; nan stays nan
    if finite and not math.isfinite(value):
        raise LayercutError(f"perplexity is {value}: the model's outputs are not finite (mean cross-entropy "
                            f"{mean:.4g}); a heal diverged, or the dtype overflows: try --dtype float32")
    return value


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None, finite: bool = True) -> float:
    """exp(mean next-token cross-entropy) over ``windows`` ``[N, T]`` (N·(T−1) predicted tokens).

    ``progress`` is an optional callable taking the number of windows done, for progress bars. A perplexity that
    is not finite raises LayercutError unless ``finite`` is False (then it is returned: inf or nan).
    """
    return perplexity_of(window_nll(model, windows, batch_size, progress), finite)


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


def task_list(options: EvalOptions) -> list[str]:
    """The zero-shot tasks the options ask for (``--eval`` alone: the seven standard ones)."""
    tasks = [task.strip() for task in options.tasks.split(",") if task.strip()]
    if not tasks and options.eval:
        from layercut.zeroshot import TASKS

        tasks = list(TASKS)
    return tasks


def wants_measures(options: EvalOptions) -> bool:
    """Whether the options ask for anything besides perplexity (zero-shot tasks or speed)."""
    return bool(task_list(options)) or options.speed or options.eval


def evaluate(model, tokenizer, test_windows: torch.Tensor | None, options: EvalOptions, batch_size: int = 4,
             seed: int = 0, progress=None) -> Measures:
    """Perplexity on ``test_windows`` ``[N, T]`` (skipped when None), and the zero-shot tasks and speed the
    options ask for. ``progress`` (optional) is called with the windows done."""
    found = Measures()
    if test_windows is not None:
        nll = window_nll(model, test_windows, batch_size, progress)
        found.perplexity, found.window_nll = perplexity_of(nll), nll.tolist()
    tasks = task_list(options)
    if tasks:
        from layercut.zeroshot import evaluate_zero_shot

        found.zero_shot = evaluate_zero_shot(model, tokenizer, tasks, options.limit, batch_size, seed)
    if options.speed or options.eval:
        found.speed = Speed(**throughput(model))
    return found


def compare_measures(before: Measures, after: Measures, layers_before: int, layers_after: int,
                     perplexity_after_cut: float | None = None, text: str | None = None,
                     test_windows: torch.Tensor | None = None) -> Metrics:
    """Dense vs pruned: perplexity on ``test_windows`` of ``text`` (with the value right after the cut),
    zero-shot retention, and the speed-up next to its limit L / (L − n)."""
    metrics = Metrics()
    if before.perplexity is not None and after.perplexity is not None:
        metrics.perplexity = PerplexityRecord(
            before=before.perplexity, after=after.perplexity,
            after_cut=after.perplexity if perplexity_after_cut is None else perplexity_after_cut, text=text,
            windows=None if test_windows is None else int(test_windows.shape[0]),
            seq_len=None if test_windows is None else int(test_windows.shape[1]),
            window_nll_before=before.window_nll, window_nll_after=after.window_nll)
    if before.zero_shot is not None and after.zero_shot is not None:
        from layercut.zeroshot import retention

        metrics.zero_shot = ZeroShotComparison(before=before.zero_shot, after=after.zero_shot,
                                               retention=retention(after.zero_shot, before.zero_shot))
    if before.speed is not None and after.speed is not None:
        metrics.speed = SpeedComparison(
            before=before.speed, after=after.speed, limit=layers_before / layers_after,
            prefill_ratio=after.speed.prefill_tokens_per_s / before.speed.prefill_tokens_per_s,
            decode_ratio=after.speed.decode_tokens_per_s / before.speed.decode_tokens_per_s)
    return metrics

"""The evaluate stage: perplexity on non-overlapping windows of held-out text, zero-shot accuracy through lm-eval
(:mod:`layercut.zeroshot`), prefill and decode speed; the comparison of a dense and a pruned evaluation; and the
pruned model's agreement with the dense one (per-token KL and top-1 on held-out text, greedy generation)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from layercut.errors import LayercutError
from layercut.forward import batches, model_device
from layercut.record import (
    Agreement,
    GenerationAgreement,
    Measures,
    Metrics,
    PerplexityRecord,
    Speed,
    SpeedComparison,
    TextAgreement,
    ZeroShotComparison,
)

if TYPE_CHECKING:
    from layercut.config import DataOptions, EvalOptions


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


# ----------------------------------------------------------------------------------------------- agreement


def token_kl_divergence(dense_log_probs: torch.Tensor, pruned_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(dense ‖ pruned) in nats per position ``[...]`` of next-token log-probabilities ``[..., V]``, in float32.

    A token the dense model gives probability 0 adds nothing, whatever the pruned model gives it."""
    dense, pruned = dense_log_probs.float(), pruned_log_probs.float()
    terms = dense.exp() * (dense - pruned)
    return torch.where(dense.exp() > 0, terms, torch.zeros_like(terms)).sum(-1)


def top1_agreement(dense_log_probs: torch.Tensor, pruned_log_probs: torch.Tensor) -> torch.Tensor:
    """Per position ``[...]``: whether both models' most likely next token is the same (bool)."""
    return dense_log_probs.argmax(-1) == pruned_log_probs.argmax(-1)


def matching_prefix(dense_tokens: torch.Tensor, pruned_tokens: torch.Tensor) -> torch.Tensor:
    """``[P]`` lengths of the longest common prefix of each row of two ``[P, K]`` token continuations."""
    return (dense_tokens == pruned_tokens).long().cumprod(-1).sum(-1)


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int, batch_size: int = 32) -> torch.Tensor:
    """``[P, new_tokens]`` greedy continuations of equal-length ``prompts`` ``[P, t]`` with the KV cache.

    Each step appends the argmax token; no token ends a continuation early, so every continuation has
    ``new_tokens`` tokens and two models' continuations compare position by position."""
    device, found = model_device(model), []
    for batch in batches(prompts, batch_size):
        mask = torch.ones(batch.shape[0], batch.shape[1] + new_tokens, dtype=torch.long, device=device)
        output = model(input_ids=batch.to(device), attention_mask=mask[:, : batch.shape[1]], use_cache=True)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for step in range(1, new_tokens):
            output = model(input_ids=token, attention_mask=mask[:, : batch.shape[1] + step],
                           past_key_values=output.past_key_values, use_cache=True)
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        found.append(torch.cat(tokens, dim=1).cpu())
    return torch.cat(found)


def generation_prompts(tokenizer, text: str, count: int, prompt_tokens: int) -> torch.Tensor:
    """``[count, prompt_tokens]`` prompts: windows of the token stream of held-out ``text`` (as
    :func:`layercut.data.evaluation_windows` cuts them, BOS first where the tokenizer adds one), evenly spread
    over the whole text."""
    from layercut.data import evaluation_windows

    windows = evaluation_windows(tokenizer, text, prompt_tokens)
    if windows.shape[0] < count:
        raise LayercutError(f"the held-out text gives {windows.shape[0]} prompts of {prompt_tokens} tokens but "
                            f"--generation-prompts asks for {count}; use fewer prompts, shorter --prompt-tokens or "
                            "a longer --ppl text")
    return windows[torch.linspace(0, windows.shape[0] - 1, count).round().long()]


@dataclass
class DenseReference:
    """What the dense model gives, kept before the cut in a bounded form.

    Per text: its test windows ``[N, T]`` and the dense final hidden states ``[N, T, H]`` (after the final norm,
    on the CPU), from which ``head`` (the dense output head, then ``softcap``) gives the exact dense
    log-probabilities again, one chunk at a time: H numbers per token are kept instead of V. ``prompts``
    ``[P, t]`` and their dense greedy ``continuations`` ``[P, K]`` (token ids) serve the generation agreement.
    """

    windows: dict[str, torch.Tensor]
    hidden: dict[str, torch.Tensor]
    head: torch.nn.Module
    softcap: float | None
    prompts: torch.Tensor | None = None
    continuations: torch.Tensor | None = None
    match_tokens: int = 16


def head_log_probs(head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities ``[b, t, V]`` of final hidden states ``[b, t, H]`` through ``head``, soft-capped
    as the model's config says."""
    flat = head(hidden.reshape(-1, hidden.shape[-1]).to(head.weight.device))
    logits = flat.view(*hidden.shape[:-1], flat.shape[-1]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.log_softmax(logits, dim=-1)


def output_head(model) -> tuple[torch.nn.Module, float | None]:
    """The model's output head and final logit soft-capping (None without); a LayercutError when the model's logits
    are not that head's output of its final hidden states."""
    from layercut.forward import head_reproduces_logits
    from layercut.layers import text_config

    probe = torch.arange(8).remainder(model.get_input_embeddings().weight.shape[0])[None]
    if not head_reproduces_logits(model, probe):
        raise LayercutError("the agreement measures read the dense model's final hidden states through its output "
                            "head, but this model's logits are more than that; run without --agreement")
    return model.get_output_embeddings(), getattr(text_config(model), "final_logit_softcapping", None)


@torch.no_grad()
def dense_reference(model, tokenizer, options: EvalOptions, data_options: DataOptions,
                    copy_head: bool = False) -> DenseReference:
    """Capture the dense model's outputs for :func:`agreement`: final hidden states on the test windows of each of
    ``options.agreement_texts`` (``data_options.seq_len`` tokens, ``ppl_windows`` windows) and the greedy
    continuations of ``options.generation_prompts`` prompts cut from the ``--ppl`` test text. ``copy_head``: keep
    a copy of the output head, for a heal that trains it (an untied head; a tied one is never trained). Both
    models' log-probabilities go through :func:`head_log_probs` alike, so a model agrees with itself exactly."""
    from layercut.data import evaluation_windows, load_text
    from layercut.forward import final_hidden

    head, softcap = output_head(model)
    copy_head = copy_head and head.weight is not model.get_input_embeddings().weight  # a tied head stays frozen
    reference = DenseReference({}, {}, copy.deepcopy(head) if copy_head else head, softcap,
                               match_tokens=options.match_tokens)
    for text in agreement_texts(options):
        windows = evaluation_windows(tokenizer, load_text(text, "test"), data_options.seq_len,
                                     data_options.ppl_windows or None)
        reference.windows[text] = windows
        reference.hidden[text] = torch.cat([final_hidden(model, batch).cpu()
                                            for batch in batches(windows, data_options.batch_size)])
    if options.generation_prompts:
        reference.prompts = generation_prompts(tokenizer, load_text(data_options.ppl, "test"),
                                               options.generation_prompts, options.prompt_tokens)
        reference.continuations = greedy_continuations(model, reference.prompts, options.new_tokens,
                                                       options.generation_batch)
    return reference


def agreement_texts(options: EvalOptions) -> list[str]:
    """The texts whose test windows measure the agreement with the dense model."""
    return [text.strip() for text in options.agreement_texts.split(",") if text.strip()]


@torch.no_grad()
def text_agreement(model, reference: DenseReference, text: str, batch_size: int = 4,
                   budget: int = 2**25) -> TextAgreement:
    """Mean per-token KL(dense ‖ pruned) and top-1 agreement of ``model`` on the reference's windows of ``text``
    (every position of every window), the log-probabilities computed in chunks of at most ``budget`` values."""
    from layercut.forward import final_hidden

    windows, dense_hidden, head = reference.windows[text], reference.hidden[text], model.get_output_embeddings()
    kl = torch.zeros(windows.shape[0], dtype=torch.float64)  # per window: sums over its positions
    agreeing = torch.zeros(windows.shape[0], dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        pruned_hidden = final_hidden(model, windows[start : start + batch_size])
        dense = dense_hidden[start : start + batch_size]
        rows = slice(start, start + dense.shape[0])
        chunk = max(1, budget // (dense.shape[0] * reference.head.weight.shape[0]))
        for first in range(0, dense.shape[1], chunk):
            dense_log_probs = head_log_probs(reference.head, reference.softcap, dense[:, first : first + chunk])
            pruned_log_probs = head_log_probs(head, reference.softcap, pruned_hidden[:, first : first + chunk])
            pruned_log_probs = pruned_log_probs.to(dense_log_probs.device)
            kl[rows] += token_kl_divergence(dense_log_probs, pruned_log_probs).double().sum(-1).cpu()
            agreeing[rows] += top1_agreement(dense_log_probs, pruned_log_probs).double().sum(-1).cpu()
    positions = windows.shape[1]
    count = windows.shape[0] * positions
    return TextAgreement(kl=kl.sum().item() / count, top1=agreeing.sum().item() / count, tokens=count,
                         windows=int(windows.shape[0]), seq_len=int(positions),
                         window_kl=(kl / positions).tolist(), window_top1=(agreeing / positions).tolist())


def generation_agreement(model, reference: DenseReference, batch_size: int = 32) -> GenerationAgreement:
    """How far ``model``'s greedy continuations of the reference prompts follow the dense ones: the mean length of
    the matching prefix, and the share of prompts whose first ``match_tokens`` tokens all match."""
    pruned = greedy_continuations(model, reference.prompts, reference.continuations.shape[1], batch_size)
    prefix = matching_prefix(reference.continuations, pruned)
    return GenerationAgreement(prompts=int(prefix.numel()), prompt_tokens=int(reference.prompts.shape[1]),
                               new_tokens=int(pruned.shape[1]), mean_prefix=prefix.float().mean().item(),
                               match_tokens=reference.match_tokens,
                               share_matching=(prefix >= reference.match_tokens).float().mean().item(),
                               prefix=prefix.tolist())


def agreement(model, reference: DenseReference, batch_size: int = 4, generation_batch: int = 32) -> Agreement:
    """``model`` (the pruned one) against the dense model's outputs in ``reference``."""
    texts = {text: text_agreement(model, reference, text, batch_size) for text in reference.windows}
    generation = None
    if reference.prompts is not None:
        generation = generation_agreement(model, reference, generation_batch)
    return Agreement(texts=texts, generation=generation)

"""The baselines' layer and block scores (tail, ShortGPT, angular, LLM-Streamline, SLEB, PPL, Taylor).

Scores are pure functions of hidden states, perplexities or weights; the loops feeding them stay thin. Hidden
states come from forward hooks on the decoder layers, not ``output_hidden_states``, whose last entry has the
final norm applied in transformers (Llama, GPT-2, OPT, Gemma, ...) and so is not the last layer's output.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from layercut.errors import LayercutError
from layercut.evaluate import batches, perplexity, token_nll
from layercut.gate import SearchResult, gated, hard_gates, hard_kl, logits_of
from layercut.layers import find_decoder_layers, format_segments, merge_adjacent
from layercut.load import model_device

logger = logging.getLogger(__name__)

CRITERIA = ("tail", "block-influence", "angular", "cosine-block", "sleb", "ppl", "taylor")


# ----------------------------------------------------------------------------------------------- pure math


def pair_cosine(states: torch.Tensor, width: int) -> torch.Tensor:
    """Cosine between ``states[l]`` and ``states[l + width]`` per token, in float32.

    ``states`` ``[L+1, ..., D]`` (``states[i]`` enters layer i, ``states[L]`` leaves the last layer).
    Returns ``[L+1-width, ...]``.
    """
    return F.cosine_similarity(states[:-width].float(), states[width:].float(), dim=-1)


def angular_distance(cosine: torch.Tensor) -> torch.Tensor:
    """arccos(cosine)/π, elementwise: 0 for parallel vectors, ½ for orthogonal, 1 for opposite."""
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


def block_influence(states: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence ``[L]``: mean over tokens of 1 − cos(input, output) of each layer.

    ``states`` ``[L+1, b, T, D]``; a layer that returns its input scores 0.
    """
    return (1 - pair_cosine(states, 1)).mean(dim=(1, 2))


def block_angular_distance(states: torch.Tensor, width: int) -> torch.Tensor:
    """Gromov et al.'s distance ``[L+1-width]`` of block ``[l, l+width)``: mean over windows of the angular
    distance between the states entering layer l and leaving layer l+width−1, at each window's last token.

    ``states`` ``[L+1, b, T, D]``.
    """
    return angular_distance(pair_cosine(states[:, :, -1], width)).mean(dim=1)


def block_cosine(states: torch.Tensor, width: int) -> torch.Tensor:
    """LLM-Streamline's similarity ``[L+1-width]`` of block ``[l, l+width)``: mean over tokens of the cosine
    between the states entering layer l and leaving layer l+width−1; ``states`` ``[L+1, b, T, D]``."""
    return pair_cosine(states, width).mean(dim=(1, 2))


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Sorted indices of the ``count`` lowest ``scores`` ``[L]``; ties go to the lower index."""
    order = torch.sort(scores, stable=True).indices[:count]
    return sorted(order.tolist())


def best_start(scores: torch.Tensor, largest: bool = False) -> int:
    """Index of the lowest (or ``largest``) entry of ``scores`` ``[S]``; ties go to the lower index."""
    values = (-scores if largest else scores).tolist()
    return min(range(len(values)), key=values.__getitem__)


def greedy_removal(cost: Callable[[list[list[int]]], list[float]], num_layers: int,
                   count: int) -> list[dict]:
    """SLEB's greedy loop: ``count`` rounds, each adding the layer whose removal together with those already
    chosen gives the lowest ``cost``; ``cost(removal sets) -> [float]`` scores a batch of sets of layers.

    Returns one record per round, ``{"removed": [chosen so far, in order], "costs": {layer: cost}}``; ties go
    to the lower layer index.
    """
    removed: list[int] = []
    rounds = []
    for _ in range(count):
        left = [i for i in range(num_layers) if i not in removed]
        costs = dict(zip(left, cost([removed + [i] for i in left])))
        removed = removed + [min(left, key=costs.__getitem__)]
        rounds.append({"removed": removed, "costs": costs})
    return rounds


def taylor_importance(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-order importance Σ |w · ∂L/∂w| over every element of every weight (a 0-d float32 tensor)."""
    terms = [(w.float() * g.float()).abs().sum().cpu() for w, g in zip(weights, grads)]
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------- model plumbing


@torch.no_grad()
def mean_over_windows(model, windows: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                      batch_size: int = 4, layers_path: str | None = None) -> torch.Tensor:
    """Window-weighted mean of ``score(states [L+1, b, T, D])`` over batches of ``windows`` ``[N, T]``.

    ``states[i]`` is what decoder layer i receives, ``states[L]`` what the last layer returns, captured by
    hooks on the layers (exact for every family, unlike ``output_hidden_states``). One batch's states are
    held at once.
    """
    _, layers = find_decoder_layers(model, layers_path)
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if module is layers[0]:
            captured.append(args[0] if args else kwargs["hidden_states"])
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    total = None
    try:
        for batch in batches(windows, batch_size):
            captured.clear()
            logits_of(model, batch)
            states = torch.stack([state.to(captured[0].device) for state in captured])
            part = score(states).cpu() * batch.shape[0]
            total = part if total is None else total + part
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
    return total / windows.shape[0]


def removal_perplexities(model, windows: torch.Tensor, removal_sets: Sequence[Sequence[int]],
                         batch_size: int = 4, layers_path: str | None = None) -> list[float]:
    """Calibration perplexity with each set of layers removed (hard 0 gates, no copy of the model)."""
    num_layers = len(find_decoder_layers(model, layers_path)[1])
    gates = hard_gates([tuple((i, i + 1) for i in removed) for removed in removal_sets], num_layers)
    found = []
    with gated(model, layers_path) as set_gates:
        for row in gates:
            set_gates(row.unsqueeze(0))
            found.append(perplexity(model, windows, batch_size))
    return found


def layer_taylor_scores(model, windows: torch.Tensor, batch_size: int = 4,
                        layers_path: str | None = None) -> torch.Tensor:
    """``[L]`` Taylor importance of each decoder layer for the mean LM loss over ``windows`` ``[N, T]``.

    The gradient is that of the loss over the whole calibration set (accumulated over batches) before the
    absolute value is taken, as in Shortened LLaMA. Gradients come from ``torch.autograd.grad`` and are never
    stored on the parameters; ``requires_grad`` flags are restored afterwards.
    """
    _, layers = find_decoder_layers(model, layers_path)
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for group in params for p in group]
    flags = [p.requires_grad for p in flat]
    sums = [torch.zeros_like(p) for p in flat]
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    try:
        for p in flat:
            p.requires_grad_(True)
        for batch in batches(windows, batch_size):
            batch = batch.to(model_device(model))
            loss = token_nll(logits_of(model, batch), batch) / tokens
            for total, grad in zip(sums, torch.autograd.grad(loss, flat, allow_unused=True)):
                if grad is not None:
                    total.add_(grad)
    finally:
        for p, flag in zip(flat, flags):
            p.requires_grad_(flag)
    scores, first = [], 0
    for group in params:
        scores.append(taylor_importance([p.detach() for p in group], sums[first : first + len(group)]))
        first += len(group)
    return torch.stack(scores)


# ----------------------------------------------------------------------------------------------- entry


def select_by_criterion(model, windows: torch.Tensor, remove: int, method: str, batch_size: int = 4,
                        layers_path: str | None = None) -> SearchResult:
    """Choose ``remove`` decoder layers by one of :data:`CRITERIA` on calibration ``windows`` ``[N, T]``.

    Segments are 0-based half-open, adjacent chosen layers merged. ``kl`` is the hard-cut KL(dense ‖ cut) on
    the same windows, so every method reports a comparable number; ``seconds`` times the selection, not that
    KL. ``landscape`` holds the scores the choice was made from, per layer (``"i:i+1"``) or per block
    (``"l:l+n"``); for ``sleb`` its first round, the single-layer removal perplexities. ``trajectory`` stays
    empty (it is the gate's per-step record); SLEB's rounds are logged instead.
    """
    if method not in CRITERIA:
        raise LayercutError(f"unknown criterion {method!r}; valid: {', '.join(CRITERIA)}")
    num_layers = len(find_decoder_layers(model, layers_path)[1])
    if not 1 <= remove < num_layers:
        raise LayercutError(
            f"cannot remove {remove} of {num_layers} layers; remove between 1 and {num_layers - 1}")
    started = time.perf_counter()
    evaluations, width, scores = 0, 1, None

    def states_mean(score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return mean_over_windows(model, windows, score, batch_size, layers_path)

    def removal_cost(sets: Sequence[Sequence[int]]) -> list[float]:
        return removal_perplexities(model, windows, sets, batch_size, layers_path)

    if method == "tail":
        chosen = list(range(num_layers - remove, num_layers))
    elif method in ("angular", "cosine-block"):
        width = remove
        if method == "angular":
            scores = states_mean(lambda states: block_angular_distance(states, remove))
        else:
            scores = states_mean(lambda states: block_cosine(states, remove))
        start = best_start(scores, largest=method == "cosine-block")
        chosen = list(range(start, start + remove))
    elif method == "sleb":
        rounds = greedy_removal(removal_cost, num_layers, remove)
        for record in rounds:
            logger.info("sleb removed %s: perplexity %.4g", record["removed"],
                        record["costs"][record["removed"][-1]])
        chosen = sorted(rounds[-1]["removed"])
        scores = torch.tensor([rounds[0]["costs"][i] for i in range(num_layers)])
        evaluations = sum(len(record["costs"]) for record in rounds)
    else:
        if method == "block-influence":
            scores = states_mean(block_influence)
        elif method == "ppl":
            scores = torch.tensor(removal_cost([[i] for i in range(num_layers)]))
            evaluations = num_layers
        else:
            scores = layer_taylor_scores(model, windows, batch_size, layers_path)
        chosen = lowest(scores, remove)
    seconds = time.perf_counter() - started
    segments = merge_adjacent([(i, i + 1) for i in chosen])
    kl = hard_kl(model, windows, [tuple(segments)], batch_size, layers_path)[0]
    values = [] if scores is None else scores.tolist()
    landscape = {f"{i}:{i + width}": value for i, value in enumerate(values)}
    logger.info("%s chose %s (KL %.4g, %.1fs)", method, format_segments(segments), kl, seconds)
    return SearchResult(method, segments, kl, seconds, evaluations, [], landscape)

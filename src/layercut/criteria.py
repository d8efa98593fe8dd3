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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layercut.errors import LayercutError
from layercut.evaluate import perplexity, token_nll
from layercut.forward import (
    batches,
    final_norm,
    gated,
    hard_gates,
    logits_of,
    mean_over_windows,
    model_device,
)
from layercut.gate import SearchResult
from layercut.layers import Handle, merge_adjacent
from layercut.report import segments_text

logger = logging.getLogger(__name__)


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


def lowest(scores: torch.Tensor, count: int, eligible: range | None = None) -> list[int]:
    """Sorted indices of the ``count`` lowest ``scores`` ``[L]`` among ``eligible`` (all by default); ties go to
    the lower index."""
    if eligible is not None:
        masked = torch.full_like(scores, float("inf"))
        masked[list(eligible)] = scores[list(eligible)]
        scores = masked
    order = torch.sort(scores, stable=True).indices[:count]
    return sorted(order.tolist())


def plus_rule(num_layers: int) -> range:
    """The layers Shortened LLaMA's "+" rule leaves eligible: all but the first four and the last two."""
    return range(4, num_layers - 2)


def with_normed_last(states: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``states`` ``[L+1, ...]`` with the final norm applied to the last entry, as transformers'
    ``output_hidden_states`` gives it (and the peers' released code reads it)."""
    if norm is None:
        return states
    return torch.cat([states[:-1], norm(states[-1:]).to(states.dtype)])


def best_start(scores: torch.Tensor, largest: bool = False) -> int:
    """Index of the lowest (or ``largest``) entry of ``scores`` ``[S]``; ties go to the lower index."""
    values = (-scores if largest else scores).tolist()
    return min(range(len(values)), key=values.__getitem__)


def greedy_removal(cost: Callable[[list[list[int]]], list[float]], num_layers: int,
                   count: int, barrier: int = 0) -> list[dict]:
    """SLEB's greedy loop: ``count`` rounds, each adding the layer whose removal together with those already
    chosen gives the lowest ``cost``; ``cost(removal sets) -> [float]`` scores a batch of sets of layers. The first
    and last ``barrier`` layers are never removed (SLEB's released code: 1).

    Returns one record per round, ``{"removed": [chosen so far, in order], "costs": {layer: cost}}``; ties go
    to the lower layer index.
    """
    removed: list[int] = []
    rounds = []
    for _ in range(count):
        left = [i for i in range(barrier, num_layers - barrier) if i not in removed]
        costs = dict(zip(left, cost([removed + [i] for i in left])))
        removed = removed + [min(left, key=costs.__getitem__)]
        rounds.append({"removed": removed, "costs": costs})
    return rounds


def taylor_importance(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-order importance Σ |w · ∂L/∂w| over every element of every weight (a 0-d float32 tensor)."""
    terms = [(w.float() * g.float()).abs().sum().cpu() for w, g in zip(weights, grads)]
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------- on a model


def removal_perplexities(handle: Handle, windows: torch.Tensor, removal_sets: Sequence[Sequence[int]],
                         batch_size: int = 4) -> list[float]:
    """Calibration perplexity with each set of layers removed (hard 0 gates, no copy of the model)."""
    gates = hard_gates([tuple((i, i + 1) for i in removed) for removed in removal_sets], handle.num_layers)
    found = []
    with gated(handle.layers) as set_gates:
        for row in gates:
            set_gates(row.unsqueeze(0))
            value = perplexity(handle.model, windows, batch_size, finite=False)
            found.append(value if math.isfinite(value) else math.inf)  # a cut that breaks the model ranks last
    return found


def layer_taylor_scores(handle: Handle, windows: torch.Tensor, batch_size: int = 4,
                        weights_only: bool = False) -> torch.Tensor:
    """``[L]`` Taylor importance of each decoder layer for the mean LM loss over ``windows`` ``[N, T]``.

    The gradient is that of the loss over the whole calibration set (accumulated over batches) before the
    absolute value is taken, as in Shortened LLaMA; ``weights_only`` leaves biases out, as its released code does.
    Gradients come from ``torch.autograd.grad`` and are never stored on the parameters; ``requires_grad`` flags
    are restored afterwards.
    """
    model = handle.model
    params = [[p for name, p in layer.named_parameters() if not weights_only or "weight" in name]
              for layer in handle.layers]
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


# ----------------------------------------------------------------------------------------------- the criteria


@dataclass(frozen=True)
class Choice:
    """The layers a criterion chose and the scores it chose them by: one per layer (``width`` 1) or one per
    block of ``width`` layers by its start."""

    layers: list[int]
    scores: torch.Tensor | None = None
    width: int = 1
    evaluations: int = 0


def choose_tail(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    return Choice(list(range(handle.num_layers - remove, handle.num_layers)))


def choose_block_influence(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = mean_over_windows(handle, windows, block_influence, batch_size)
    return Choice(lowest(scores, remove), scores)


def choose_angular(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = mean_over_windows(handle, windows, lambda states: block_angular_distance(states, remove), batch_size)
    start = best_start(scores)
    return Choice(list(range(start, start + remove)), scores, remove)


def choose_cosine_block(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = mean_over_windows(handle, windows, lambda states: block_cosine(states, remove), batch_size)
    start = best_start(scores, largest=True)
    return Choice(list(range(start, start + remove)), scores, remove)


def choose_sleb(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    rounds = greedy_removal(lambda sets: removal_perplexities(handle, windows, sets, batch_size), handle.num_layers,
                            remove)
    for record in rounds:
        logger.info("sleb removed %s: perplexity %.4g", record["removed"], record["costs"][record["removed"][-1]])
    scores = torch.tensor([rounds[0]["costs"][i] for i in range(handle.num_layers)])
    return Choice(sorted(rounds[-1]["removed"]), scores, evaluations=sum(len(r["costs"]) for r in rounds))


def choose_ppl(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = torch.tensor(removal_perplexities(handle, windows, [[i] for i in range(handle.num_layers)], batch_size))
    return Choice(lowest(scores, remove), scores, evaluations=handle.num_layers)


def choose_taylor(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = layer_taylor_scores(handle, windows, batch_size)
    return Choice(lowest(scores, remove), scores)


def choose_ppl_plus(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    layers = plus_rule(handle.num_layers)
    if remove > len(layers):
        raise LayercutError(f"the + rule leaves {len(layers)} eligible layers of {handle.num_layers}; remove fewer")
    scores = torch.tensor(removal_perplexities(handle, windows, [[i] for i in range(handle.num_layers)], batch_size))
    return Choice(lowest(scores, remove, layers), scores, evaluations=handle.num_layers)


def choose_taylor_plus(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    layers = plus_rule(handle.num_layers)
    if remove > len(layers):
        raise LayercutError(f"the + rule leaves {len(layers)} eligible layers of {handle.num_layers}; remove fewer")
    scores = layer_taylor_scores(handle, windows, batch_size, weights_only=True)
    return Choice(lowest(scores, remove, layers), scores)


def choose_sleb_barrier(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    if remove > handle.num_layers - 2:
        raise LayercutError(f"SLEB never removes the first or last layer; remove at most {handle.num_layers - 2}")
    rounds = greedy_removal(lambda sets: removal_perplexities(handle, windows, sets, batch_size), handle.num_layers,
                            remove, barrier=1)
    costs = rounds[0]["costs"]
    scores = torch.tensor([costs.get(i, float("nan")) for i in range(handle.num_layers)])
    return Choice(sorted(rounds[-1]["removed"]), scores, evaluations=sum(len(r["costs"]) for r in rounds))


def _normed_states_mean(handle: Handle, windows: torch.Tensor, score, batch_size: int) -> torch.Tensor:
    norm = final_norm(handle.model)
    return mean_over_windows(handle, windows, lambda states: score(with_normed_last(states, norm)), batch_size)


def choose_block_influence_norm(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = _normed_states_mean(handle, windows, block_influence, batch_size)
    return Choice(lowest(scores, remove), scores)


def choose_angular_pruneme(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    scores = _normed_states_mean(handle, windows, lambda states: block_angular_distance(states, remove), batch_size)
    start = 1 + best_start(scores[1:])  # the block starting at layer 0 is never scored
    return Choice(list(range(start, start + remove)), scores, remove)


def choose_cosine_streamline(handle: Handle, windows: torch.Tensor, remove: int, batch_size: int) -> Choice:
    if remove + 1 > handle.num_layers:
        raise LayercutError(f"LLM-Streamline measures a block of n + 1 layers; remove at most {handle.num_layers - 1}")
    scores = _normed_states_mean(handle, windows, lambda states: block_cosine(states, remove + 1), batch_size)
    start = best_start(scores, largest=True)  # block [l, l + n]: layer l stays, the n after it go
    return Choice(list(range(start + 1, start + 1 + remove)), scores, remove + 1)


@dataclass(frozen=True)
class Criterion:
    choose: Callable[[Handle, torch.Tensor, int, int], Choice]
    help: str


CRITERIA: dict[str, Criterion] = {
    "tail": Criterion(choose_tail, "the last n layers (Reassessing Layer Pruning)"),
    "block-influence": Criterion(choose_block_influence,
                                 "ShortGPT: the n layers whose output is most like their input (1 − cosine)"),
    "angular": Criterion(choose_angular, "Gromov et al.: the block of n layers with the smallest angular distance "
                                         "between its input and output at the last token"),
    "cosine-block": Criterion(choose_cosine_block, "LLM-Streamline: the block of n layers whose input and output "
                                                   "are most similar (cosine over every token)"),
    "sleb": Criterion(choose_sleb, "SLEB: remove one layer at a time, each the one whose removal keeps the "
                                   "calibration perplexity lowest"),
    "ppl": Criterion(choose_ppl, "Shortened LLaMA (PPL): the n layers whose single removal raises the calibration "
                                 "perplexity least"),
    "taylor": Criterion(choose_taylor, "Shortened LLaMA (Taylor): the n layers of least first-order importance "
                                       "|w · dL/dw|"),
    "ppl-plus": Criterion(choose_ppl_plus, "ppl as Shortened LLaMA's released code runs it: the + rule keeps the "
                                           "first four and last two layers"),
    "taylor-plus": Criterion(choose_taylor_plus, "taylor as Shortened LLaMA's released code runs it: weights only, "
                                                 "and the + rule"),
    "sleb-barrier": Criterion(choose_sleb_barrier, "sleb as SLEB's released code runs it: the first and last layers "
                                                   "are never removed"),
    "block-influence-norm": Criterion(choose_block_influence_norm, "block-influence as ShortGPT's released code "
                                                                   "reads states: the final norm on the last one"),
    "angular-pruneme": Criterion(choose_angular_pruneme, "angular as PruneMe's released code runs it: no block "
                                                         "starting at layer 0, the final norm on the last state"),
    "cosine-streamline": Criterion(choose_cosine_streamline, "cosine-block as LLM-Streamline's released code runs "
                                                             "it: the most similar block of n + 1 layers, the n after "
                                                             "its first cut"),
}


def select_by_criterion(handle: Handle, windows: torch.Tensor, remove: int, method: str,
                        batch_size: int = 4) -> SearchResult:
    """Choose ``remove`` decoder layers by one of :data:`CRITERIA` on calibration ``windows`` ``[N, T]``.

    Segments are 0-based half-open, adjacent chosen layers merged. ``kl`` is NaN here: the search stage
    (:mod:`layercut.selection`) scores the chosen cut as it scores every method's, with :func:`layercut.gate.cut_kl`;
    ``seconds`` times the selection. ``landscape`` holds the scores the choice was made from, per layer (``"i:i+1"``) or per block
    (``"l:l+n"``); for ``sleb`` its first round, the single-layer removal perplexities. ``trajectory`` stays
    empty (it is the gate's per-step record); SLEB's rounds are logged instead.
    """
    if method not in CRITERIA:
        raise LayercutError(f"unknown criterion {method!r}; valid: {', '.join(CRITERIA)}")
    if not 1 <= remove < handle.num_layers:
        raise LayercutError(
            f"cannot remove {remove} of {handle.num_layers} layers; remove between 1 and {handle.num_layers - 1}")
    started = time.perf_counter()
    choice = CRITERIA[method].choose(handle, windows, remove, batch_size)
    seconds = time.perf_counter() - started
    segments = merge_adjacent([(i, i + 1) for i in choice.layers])
    values = [] if choice.scores is None else choice.scores.tolist()
    landscape = {f"{i}:{i + choice.width}": value for i, value in enumerate(values)}
    logger.info("%s chose %s (%.1fs)", method, segments_text(segments), seconds)
    return SearchResult(method, segments, float("nan"), seconds, choice.evaluations, [], landscape)

"""The concave gate: a soft notch over depth whose learned position finds the segment whose removal hurts least.

Decoder layer i computes ``h + g_i·(f_i(h) − h)``. ``g = 1`` is the dense model, ``g = 0`` on ``[s, e)`` equals
cutting ``[s, e)``. The gate profile is 1 everywhere except soft notches whose starts (and, with several notches,
widths) are continuous parameters trained to minimise KL(dense ‖ gated) on calibration windows.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from layercut.errors import LayercutError
from layercut.forward import checkpointed_layers, gated, hard_kl, head_reproduces_logits, kl_rows, outputs_of
from layercut.layers import Candidate, Handle, Segment, merge_adjacent

if TYPE_CHECKING:
    from layercut.config import SearchOptions

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- pure math


def notch_mask(starts: torch.Tensor, widths: torch.Tensor, num_layers: int, tau: float) -> torch.Tensor:
    """Soft removal mask ``[R, L]`` for ``R`` profiles of ``K`` notches each.

    ``starts`` and ``widths`` are ``[R, K]`` (in layers). Notch k covers layer i with weight
    ``σ((i − s_k + ½)/τ) · σ((s_k + n_k − ½ − i)/τ)``; as τ → 0 and for integer s_k, n_k it is exactly the
    indicator of ``i ∈ [s_k, s_k + n_k)``. Notches combine as a union: ``1 − Π_k (1 − m_k)``.
    """
    depth = torch.arange(num_layers, dtype=starts.dtype, device=starts.device)  # [L]
    s = starts.unsqueeze(-1)  # [R, K, 1]
    n = widths.unsqueeze(-1)
    inside = torch.sigmoid((depth - s + 0.5) / tau) * torch.sigmoid((s + n - 0.5 - depth) / tau)  # [R, K, L]
    return 1 - torch.prod(1 - inside, dim=1)


def temperature(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Geometric annealing from ``tau_start`` at step 0 to ``tau_end`` at the last step."""
    if steps <= 1:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (step / (steps - 1))


def initial_starts(num_layers: int, width: int, profiles: int, segments: int) -> torch.Tensor:
    """``[R, K]`` starting positions: notch k of profile r sits in the k-th of K equal depth bands, at a
    profile-specific offset, so the R profiles together sweep the whole depth."""
    band = num_layers / segments
    offsets = (torch.arange(profiles, dtype=torch.float32) + 0.5) / profiles  # [R]
    starts = torch.arange(segments, dtype=torch.float32) * band + offsets.unsqueeze(1) * max(band - width, 0.0)
    return starts.clamp(0, max(num_layers - width, 0))


def round_widths(widths: Sequence[float], total: int) -> list[int]:
    """Whole-layer widths (each ≥ 1) summing to ``total``, by largest remainder."""
    floors = [max(1, math.floor(w)) for w in widths]
    while sum(floors) > total:
        floors[floors.index(max(floors))] -= 1
    order = sorted(range(len(widths)), key=lambda k: widths[k] - math.floor(widths[k]), reverse=True)
    for k in order[: total - sum(floors)]:
        floors[k] += 1
    while sum(floors) < total:
        floors[floors.index(min(floors))] += 1
    return floors


def to_candidate(starts: Sequence[float], widths: Sequence[int], num_layers: int) -> Candidate | None:
    """Round notch starts to whole layers; None when the segments would overlap or leave no layer."""
    segments = []
    for start, width in zip(starts, widths):
        first = int(min(max(round(start), 0), num_layers - width))
        segments.append((first, first + width))
    segments.sort()
    if any(b[0] < a[1] for a, b in itertools.pairwise(segments)):
        return None
    if sum(e - s for s, e in segments) >= num_layers:
        return None
    return tuple(merge_adjacent(segments))


def neighbours(candidate: Candidate, num_layers: int) -> list[Candidate]:
    """Candidates one step away: one segment shifted by ±1, or one layer of width moved between two segments."""
    found = []
    segments = list(candidate)
    for k, (start, end) in enumerate(segments):
        for shift in (-1, 1):
            moved = segments.copy()
            moved[k] = (start + shift, end + shift)
            found.append(moved)
    for giver in range(len(segments)):
        for taker in range(len(segments)):
            if giver == taker or segments[giver][1] - segments[giver][0] < 2:
                continue
            for give_end in (0, 1):
                for take_end in (0, 1):
                    moved = segments.copy()
                    s, e = moved[giver]
                    moved[giver] = (s + 1, e) if give_end == 0 else (s, e - 1)
                    s, e = moved[taker]
                    moved[taker] = (s - 1, e) if take_end == 0 else (s, e + 1)
                    found.append(moved)
    valid = []
    for moved in found:
        moved.sort()
        if moved[0][0] < 0 or moved[-1][1] > num_layers:
            continue
        if any(b[0] <= a[1] for a, b in itertools.pairwise(moved)) and len(moved) > 1:
            continue
        valid.append(tuple(moved))
    return list(dict.fromkeys(valid))


# ----------------------------------------------------------------------------------------------- search loop


@dataclass
class SearchResult:
    """What a segment search found, and how."""

    method: str
    segments: list[Segment]
    kl: float
    seconds: float
    evaluations: int = 0
    trajectory: list[dict] = field(default_factory=list)
    landscape: dict[str, float] = field(default_factory=dict)

    def summary(self, with_details: bool = False) -> dict:
        """The result as plain JSON data (KL None for given segments); ``with_details`` adds the gate's
        trajectory and the landscape of scored cuts."""
        result = {"method": self.method, "segments": [list(s) for s in self.segments],
                  "kl": None if math.isnan(self.kl) else self.kl, "seconds": self.seconds,
                  "evaluations": self.evaluations}
        if with_details:
            result.update(trajectory=self.trajectory, landscape=self.landscape)
        return result


def refine(candidates: Iterable[Candidate], hard_objective: Callable[[list[Candidate]], list[float]],
           num_layers: int, known: dict[Candidate, float] | None = None, max_rounds: int = 64) -> tuple[Candidate, float]:
    """Evaluate ``candidates`` exactly, then hill-climb over :func:`neighbours` until no neighbour is better."""
    known = {} if known is None else known

    def score(batch: list[Candidate]) -> None:
        new = [c for c in dict.fromkeys(batch) if c not in known]
        if new:
            known.update(zip(new, hard_objective(new)))

    score(list(candidates))
    best = min(known, key=known.get)
    for _ in range(max_rounds):
        around = neighbours(best, num_layers)
        score(around)
        challenger = min(around + [best], key=known.get)
        if known[challenger] >= known[best]:
            break
        best = challenger
    return best, known[best]


def default_profiles(num_layers: int, remove: int) -> int:
    """Profiles trained side by side when ``--gate-profiles`` is 0: enough starts that their spacing over the
    depth is about half the removed width (at least 3 layers)."""
    return max(1, math.ceil((num_layers - remove + 1) / max(3, remove // 2)))


def search_notches(objective: Callable[[torch.Tensor], torch.Tensor],
                   hard_objective: Callable[[list[Candidate]], list[float]],
                   num_layers: int, remove: int, options: SearchOptions, progress=None) -> SearchResult:
    """Train ``options.gate_profiles`` gate profiles of ``options.segments`` notches each (together removing
    ``remove`` layers) for ``options.gate_steps`` steps.

    ``objective(gates [R, L]) -> [R]`` is the differentiable loss of each profile (KL on a calibration batch);
    ``hard_objective(candidates) -> [float]`` the exact loss of hard cuts on the whole calibration set. Each
    profile starts at a different depth, so together they cover the depth's basins; the read-out rounds every
    profile to whole layers, scores those cuts and their neighbours exactly and hill-climbs to a local optimum
    of the hard loss.
    """
    started = time.perf_counter()
    segments, steps = options.segments, options.gate_steps
    profiles = options.gate_profiles if options.gate_profiles > 0 else default_profiles(num_layers, remove)
    starts = initial_starts(num_layers, remove // segments, profiles, segments).requires_grad_(True)
    width_logits = torch.zeros(profiles, segments, requires_grad=True)
    parameters = [starts, width_logits] if segments > 1 else [starts]
    optimizer = torch.optim.Adam(parameters, lr=options.gate_lr)
    trajectory = []
    for step in range(steps):
        tau = temperature(step, steps, options.tau_start, options.tau_end)
        widths = remove * torch.softmax(width_logits, dim=-1)
        gates = 1 - notch_mask(starts, widths, num_layers, tau)
        losses = objective(gates)
        if not torch.isfinite(losses).all():
            raise LayercutError(f"the gate's KL is not finite at step {step + 1} ({losses.tolist()}); lower --gate-lr "
                                "or load the model in float32 (--dtype float32)")
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        with torch.no_grad():
            widths = remove * torch.softmax(width_logits, dim=-1)
            starts.copy_(torch.minimum(starts.clamp(min=0), num_layers - widths))
        trajectory.append({"step": step, "tau": tau, "loss": losses.detach().tolist(),
                           "starts": starts.detach().tolist(), "widths": widths.detach().tolist()})
        logger.debug("gate step %d tau %.3f loss %s", step, tau, losses.detach().tolist())
        if progress is not None:
            progress(1)
    widths = (remove * torch.softmax(width_logits, dim=-1)).detach()
    readouts = []
    for row in range(profiles):
        whole = round_widths(widths[row].tolist(), remove)
        candidate = to_candidate(starts[row].tolist(), whole, num_layers)
        if candidate is not None:
            readouts.append(candidate)
    if not readouts:
        readouts.append(tuple((k * (num_layers // segments), k * (num_layers // segments) + remove // segments)
                              for k in range(segments)))
    known: dict[Candidate, float] = {}
    around = [n for c in readouts for n in neighbours(c, num_layers)]
    best, best_kl = refine(readouts + around, hard_objective, num_layers, known)
    return SearchResult("clp", list(best), best_kl, time.perf_counter() - started, len(known), trajectory,
                        {candidate_key(c): v for c, v in known.items()})


def exhaustive(hard_objective: Callable[[list[Candidate]], list[float]], num_layers: int, remove: int) -> SearchResult:
    """Exact loss of every contiguous window of ``remove`` layers; the reference the gate is judged against."""
    started = time.perf_counter()
    candidates = [((start, start + remove),) for start in range(num_layers - remove + 1)]
    losses = hard_objective(candidates)
    best = min(range(len(candidates)), key=losses.__getitem__)
    return SearchResult("exhaustive", list(candidates[best]), losses[best], time.perf_counter() - started,
                        len(candidates), [], {candidate_key(c): v for c, v in zip(candidates, losses)})


def candidate_key(candidate: Candidate) -> str:
    """``((2, 4), (7, 9)) -> "2:4 7:9"``: the key of a cut in a search landscape."""
    return " ".join(f"{s}:{e}" for s, e in candidate)


# ----------------------------------------------------------------------------------------------- on a model


def exact_objective(handle: Handle, windows: torch.Tensor, batch_size: int,
                    chunked_head: bool | None = None) -> Callable[[list[Candidate]], list[float]]:
    """``candidates -> [hard-cut KL]`` on ``windows`` ``[N, T]``; the output head is checked once, not per call."""
    if chunked_head is None:
        chunked_head = head_reproduces_logits(handle.model, windows[:1, :16])
        logger.info("KL over %s", "chunks of the output head" if chunked_head else "full logits")

    def hard_objective(candidates: list[Candidate]) -> list[float]:
        losses = hard_kl(handle, windows, candidates, batch_size, chunked_head=chunked_head)
        if not all(math.isfinite(loss) for loss in losses):
            raise LayercutError("the KL of a cut is not finite: the model's outputs overflow; load it in float32 "
                                "(--dtype float32)")
        return losses

    return hard_objective


def search_exhaustive(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions,
                      batch_size: int = 4, seed: int = 0, progress=None) -> SearchResult:
    """The exact oracle: the hard-cut KL of every contiguous window of ``remove`` layers on ``windows``."""
    return exhaustive(exact_objective(handle, windows, batch_size), handle.num_layers, remove)


def search_gate(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int = 4,
                seed: int = 0, progress=None) -> SearchResult:
    """Choose ``remove`` layers to cut with the concave gate (CLP) on the calibration ``windows`` ``[N, T]``.

    Each gate step uses ``options.gate_windows`` windows, drawn with a generator seeded by ``seed``. Model
    weights are frozen; only the gate parameters train. The KL is taken over chunks of positions from final
    hidden states when the output head alone makes the logits (checked once), and ``gate_checkpointing``
    recomputes each layer in backward instead of storing its activations. ``progress`` is called with 1 after
    each gate step.
    """
    model, layers = handle.model, handle.layers
    chunked_head = head_reproduces_logits(model, windows[:1, :16])
    logger.info("KL over %s", "chunks of the output head" if chunked_head else "full logits")
    hard_objective = exact_objective(handle, windows, batch_size, chunked_head)
    generator = torch.Generator().manual_seed(seed)
    step_windows = min(options.gate_windows, windows.shape[0])
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with gated(layers) as set_gates, \
                (checkpointed_layers(model, layers) if options.gate_checkpointing else contextlib.nullcontext()):

            def objective(gates: torch.Tensor) -> torch.Tensor:
                batch = windows[torch.randint(0, windows.shape[0], (step_windows,), generator=generator)]
                with torch.no_grad():
                    set_gates(None)
                    teacher = outputs_of(model, batch, chunked_head)
                # The gates stay installed until the next call: checkpointed layers rerun them during backward.
                set_gates(gates)
                student = outputs_of(model, batch.repeat(gates.shape[0], 1), chunked_head)
                kl = kl_rows(model, teacher, student, chunked_head)
                return kl.view(gates.shape[0], batch.shape[0]).mean(dim=1).cpu()

            def exact(candidates: list[Candidate]) -> list[float]:
                set_gates(None)  # the last soft gates must not act under the read-out's own hooks
                return hard_objective(candidates)

            return search_notches(objective, exact, handle.num_layers, remove, options, progress)
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)

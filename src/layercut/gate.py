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
from layercut.forward import ExactKL, checkpointed_layers, final_hidden, gated, kl_rows, outputs_of
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


def settled_layers(gates: torch.Tensor, tolerance: float = 1e-3) -> int:
    """How many leading layers have every profile's gate within ``tolerance`` of 1 (``gates`` ``[R, L]``). The
    gated model computes the dense model's states there, to within the tolerance, so they need not be run."""
    open_rows = (gates.detach() < 1 - tolerance).any(dim=0).nonzero()
    return int(open_rows[0]) if open_rows.numel() else gates.shape[1]


def distinct_profiles(rounded: Sequence[Candidate | None], losses: Sequence[float]) -> list[int]:
    """Indices of the profiles to keep training: of the profiles that round to the same cut, the one with the
    lowest loss (profiles in one basin follow the same path from there on); every profile that rounds to no
    valid cut. Order is kept."""
    best: dict[Candidate, int] = {}
    for index, candidate in enumerate(rounded):
        if candidate is not None and (candidate not in best or losses[index] < losses[best[candidate]]):
            best[candidate] = index
    return [index for index, candidate in enumerate(rounded) if candidate is None or best[candidate] == index]


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
    """Cuts one step away: one segment shifted by ±1, or one layer of width moved from one segment's end to
    another's. A segment that gives its last layer vanishes, and segments that come to touch merge, so the
    neighbourhood also holds cuts of fewer segments."""
    found = []
    segments = list(candidate)
    for k, (start, end) in enumerate(segments):
        for shift in (-1, 1):
            moved = segments.copy()
            moved[k] = (start + shift, end + shift)
            found.append(moved)
    for giver in range(len(segments)):
        for taker in range(len(segments)):
            if giver == taker:
                continue
            for give_end in (0, 1):
                for take_end in (0, 1):
                    moved = segments.copy()
                    s, e = moved[giver]
                    moved[giver] = (s + 1, e) if give_end == 0 else (s, e - 1)
                    s, e = moved[taker]
                    moved[taker] = (s - 1, e) if take_end == 0 else (s, e + 1)
                    found.append([(s, e) for s, e in moved if e > s])
    valid = []
    for moved in found:
        moved.sort()
        if moved[0][0] < 0 or moved[-1][1] > num_layers:
            continue
        if any(b[0] < a[1] for a, b in itertools.pairwise(moved)):  # overlapping: not a cut
            continue
        merged = tuple(merge_adjacent(moved))
        if merged != candidate:
            valid.append(merged)
    return list(dict.fromkeys(valid))


def count_cuts(num_layers: int, remove: int, segments: int) -> int:
    """How many cuts remove ``remove`` of ``num_layers`` layers in at most ``segments`` separate segments:
    k segments are a composition of ``remove`` into k parts placed in k of the ``num_layers − remove + 1`` gaps
    between the kept layers."""
    return sum(math.comb(remove - 1, k - 1) * math.comb(num_layers - remove + 1, k)
               for k in range(1, segments + 1))


def cuts(num_layers: int, remove: int, segments: int) -> list[Candidate]:
    """Every cut of ``remove`` layers in at most ``segments`` separate (non-touching) segments, each as sorted
    half-open segments; :func:`count_cuts` of them."""
    found: list[Candidate] = []

    def place(first: int, left: int, parts: int, prefix: Candidate) -> None:
        for start in range(first, num_layers - left + 1):
            for width in range(1, left + 1):
                here = (*prefix, (start, start + width))
                if width == left:
                    found.append(here)
                elif parts > 1:
                    place(start + width + 1, left - width, parts - 1, here)

    place(0, remove, segments, ())
    return found


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


def refine(candidates: Iterable[Candidate], exact: Callable[[list[Candidate]], list[float]],
           num_layers: int, known: dict[Candidate, float] | None = None, max_rounds: int = 64) -> tuple[Candidate, float]:
    """Score ``candidates`` exactly, then hill-climb over :func:`neighbours` until no neighbour is better;
    ``known`` holds (and receives) every exact score."""
    known = {} if known is None else known

    def score(batch: list[Candidate]) -> None:
        new = [c for c in dict.fromkeys(batch) if c not in known]
        if new:
            known.update(zip(new, exact(new)))

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


def refine_beam(known: dict[Candidate, float], exact: Callable[[list[Candidate]], list[float]], num_layers: int,
                segments: int, width: int, max_rounds: int = 64) -> int:
    """Hill-climb the ``width`` lowest cuts of ``segments`` segments in ``known`` together: score exactly (into
    ``known``) every :func:`neighbours` cut of theirs not scored yet, and repeat until those ``width`` stop
    changing. :func:`refine` climbs from the best cut alone and stops at its local optimum, where a cut two steps
    away can be lower: on SmolLM2-135M, 10 of 30 at calibration seed 1, the gate's read-outs end at
    [3, 6) + [12, 19) (KL 1.5289) while [4, 8) + [13, 19), a neighbour of the third and fourth lowest, has 1.5014.
    Returns how many cuts it scored."""

    def lowest() -> list[Candidate]:
        return sorted((c for c in known if len(c) == segments), key=known.__getitem__)[:width]

    scored, current = 0, lowest()
    for _ in range(max_rounds):
        new = list(dict.fromkeys(n for c in current for n in neighbours(c, num_layers) if n not in known))
        if new:
            known.update(zip(new, exact(new)))
            scored += len(new)
        following = lowest()
        if following == current:
            break
        current = following
    return scored


SCREENED = 3  # read-out cuts scored exactly after screening

# The gate's settings by the number of segments, where the --gate-* options are not given. Measured on SmolLM2-135M,
# 12 single-segment cases: with one segment the lean setting (2 windows' first 128 tokens, 64 positions) reaches the
# exact oracle in 12 of 12 (bench/results/search-cpu/recorded and git history), and so does every schedule from
# 1 to about 0.4 layers of 4 to 10 steps at a learning rate that lets a profile travel 2 layers (search-h200). A gate
# step costs about the same on a GPU whatever its tokens (its kernel launches), so the default takes 5 steps; a read-out
# screened on 1, 2, 4 or 8 windows returned the same cut in every recorded run (search-h200). With several segments
# the lean setting missed the exact two-segment optimum at n = 8, which the full setting found in 3 of 3.
GATE_SETTINGS = {
    "one segment": {"gate_steps": 5, "gate_lr": 0.4, "tau_end": 0.4, "gate_windows": 2, "gate_context": 128,
                    "gate_positions": 64, "gate_screen": 4},
    "several segments": {"gate_steps": 60, "gate_lr": 0.2, "tau_end": 0.05, "gate_windows": 4, "gate_context": 0,
                         "gate_positions": 0, "gate_screen": 0},
}


def gate_settings(options: SearchOptions) -> SearchOptions:
    """``options`` with every gate setting left unset taken from :data:`GATE_SETTINGS`."""
    table = GATE_SETTINGS["one segment" if options.segments == 1 else "several segments"]
    missing = {key: value for key, value in table.items() if getattr(options, key) is None}
    return options.replace(**missing) if missing else options


def default_profiles(num_layers: int, remove: int) -> int:
    """Profiles trained side by side when ``--gate-profiles`` is 0: enough starts that their spacing over the
    depth is about half the removed width (at least 3 layers)."""
    return max(1, math.ceil((num_layers - remove + 1) / max(3, remove // 2)))


def readout(starts: torch.Tensor, widths: torch.Tensor, num_layers: int, remove: int) -> list[Candidate]:
    """Each profile rounded to whole layers (distinct, valid cuts, in profile order)."""
    found = []
    for row in range(starts.shape[0]):
        candidate = to_candidate(starts[row].tolist(), round_widths(widths[row].tolist(), remove), num_layers)
        if candidate is not None:
            found.append(candidate)
    return list(dict.fromkeys(found))


def search_notches(objective: Callable[[torch.Tensor], torch.Tensor],
                   exact: Callable[[list[Candidate]], list[float]],
                   num_layers: int, remove: int, options: SearchOptions, progress=None,
                   known: dict[Candidate, float] | None = None,
                   screen: Callable[[list[Candidate]], list[float]] | None = None) -> SearchResult:
    """Train ``options.gate_profiles`` gate profiles of ``options.segments`` notches each (together removing
    ``remove`` layers) for at most ``options.gate_steps`` steps.

    ``objective(gates [R, L]) -> [R]`` is the differentiable loss of each profile (KL on a calibration batch);
    ``exact(candidates) -> [float]`` the exact loss of hard cuts on the whole calibration set. Each profile starts
    at a different depth, so together they cover the depth's basins. After each step, of the profiles that round to
    the same cut only the one with the lowest loss trains on, so the population shrinks to one profile per basin.
    Training stops early once every profile's rounding to whole layers has stayed the same for
    ``options.gate_patience`` steps. The read-out scores those
    cuts, their neighbours and any cuts already in ``known`` exactly and hill-climbs to a local optimum of the
    exact loss; a notch may vanish or merge with another there, so the result has at most ``segments`` segments.
    With ``screen`` (the loss on a few windows), the read-out's cuts are screened first and only the best
    :data:`SCREENED` are scored exactly.
    """
    started = time.perf_counter()
    options = gate_settings(options)
    starts, widths, trajectory = train_notches(objective, num_layers, remove, options, progress)
    readouts = readout(starts, widths, num_layers, remove)
    if not readouts:
        segments = options.segments
        readouts.append(tuple((k * (num_layers // segments), k * (num_layers // segments) + remove // segments)
                              for k in range(segments)))
    known = {} if known is None else known
    candidates = list(dict.fromkeys(readouts + [n for c in readouts for n in neighbours(c, num_layers)]))
    if screen is not None and len(candidates) > SCREENED:
        screened = dict(zip(candidates, screen(candidates)))
        candidates = sorted(candidates, key=screened.get)[:SCREENED]
    best, best_kl = refine(candidates, exact, num_layers, known)
    return SearchResult("clp", list(best), best_kl, time.perf_counter() - started, len(known), trajectory,
                        {candidate_key(c): v for c, v in known.items()})


def train_notches(objective: Callable[[torch.Tensor], torch.Tensor], num_layers: int, remove: int,
                  options: SearchOptions, progress=None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The gate's training loop of :func:`search_notches` (``options`` with its gate settings resolved): the
    starts ``[R', S]`` and widths ``[R', S]`` of the R' profiles left after the collapse, and the trajectory."""
    segments, steps = options.segments, options.gate_steps
    profiles = options.gate_profiles if options.gate_profiles > 0 else default_profiles(num_layers, remove)
    starts = initial_starts(num_layers, remove // segments, profiles, segments).requires_grad_(True)
    width_logits = torch.zeros(profiles, segments, requires_grad=True)
    parameters = [starts, width_logits] if segments > 1 else [starts]
    optimizer = torch.optim.Adam(parameters, lr=options.gate_lr)
    trajectory, stable, last, active = [], 0, None, list(range(profiles))
    for step in range(steps):
        tau = temperature(step, steps, options.tau_start, options.tau_end)
        loss, widths = notch_step(objective, optimizer, starts, width_logits, active, remove, num_layers, tau, step)
        trajectory.append({"step": step, "tau": tau, "loss": [loss.get(r) for r in range(profiles)],
                           "active": active, "starts": starts.detach().tolist(), "widths": widths.detach().tolist()})
        logger.debug("gate step %d tau %.3f loss %s", step, tau, loss)
        if progress is not None:
            progress(1)
        active, rounded = collapse(starts, widths, loss, active, remove, num_layers)
        stable = stable + 1 if rounded == last else 0
        last = rounded
        if options.gate_patience and stable >= options.gate_patience:
            logger.info("gate read-out stable for %d steps: stopped after step %d of %d", stable, step + 1, steps)
            break
    widths = (remove * torch.softmax(width_logits, dim=-1)).detach()
    return starts.detach()[active], widths[active], trajectory


def notch_step(objective: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               starts: torch.Tensor, width_logits: torch.Tensor, active: list[int], remove: int, num_layers: int,
               tau: float, step: int) -> tuple[dict[int, float], torch.Tensor]:
    """One gate step on the ``active`` profiles: their losses by profile, and the widths ``[R, S]`` after the step
    (the starts are kept inside the depth in place)."""
    widths = remove * torch.softmax(width_logits, dim=-1)
    gates = 1 - notch_mask(starts[active], widths[active], num_layers, tau)
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
    return dict(zip(active, losses.detach().tolist())), widths


def collapse(starts: torch.Tensor, widths: torch.Tensor, loss: dict[int, float], active: list[int], remove: int,
             num_layers: int) -> tuple[list[int], list[Candidate]]:
    """Of the ``active`` profiles that round to the same cut, the one with the lowest ``loss`` stays: the profiles
    left, and their cuts (the read-out so far)."""
    cut_of = [to_candidate(starts[r].tolist(), round_widths(widths[r].tolist(), remove), num_layers) for r in active]
    keep = distinct_profiles(cut_of, [loss[r] for r in active])
    return [active[k] for k in keep], [cut_of[k] for k in keep if cut_of[k] is not None]


def exhaustive(exact: Callable[[list[Candidate]], list[float]], num_layers: int, remove: int,
               segments: int = 1) -> SearchResult:
    """The exact loss of every cut of ``remove`` layers in at most ``segments`` segments; the reference the gate is
    judged against."""
    started = time.perf_counter()
    candidates = cuts(num_layers, remove, segments)
    losses = exact(candidates)
    best = min(range(len(candidates)), key=losses.__getitem__)
    return SearchResult("exhaustive", list(candidates[best]), losses[best], time.perf_counter() - started,
                        len(candidates), [], {candidate_key(c): v for c, v in zip(candidates, losses)})


def cost_model(layers: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """``(per_cut, per_layer)`` seconds fitted to probes that ran ``layers`` decoder layers in ``seconds``: a cut
    costs a fixed part (the output head and the KL, which dominate with a large vocabulary) plus a part per layer
    it runs. With one probe, or probes of equal depth, the whole cost is put on the layers."""
    if len(layers) < 2 or layers[0] == layers[-1]:
        return 0.0, seconds[0] / max(layers[0], 1)
    per_layer = max(0.0, (seconds[0] - seconds[-1]) / (layers[0] - layers[-1]))
    return max(0.0, seconds[0] - per_layer * layers[0]), per_layer


def candidate_key(candidate: Candidate) -> str:
    """``((2, 4), (7, 9)) -> "2:4 7:9"``: the key of a cut in a search landscape."""
    return " ".join(f"{s}:{e}" for s, e in candidate)


# ----------------------------------------------------------------------------------------------- on a model


def exact_scorer(handle: Handle, windows: torch.Tensor, options: SearchOptions, batch_size: int = 4) -> ExactKL:
    """The shared exact scorer of the search: the dense model run once over ``windows``, within the options'
    memory budget."""
    scorer = ExactKL(handle, windows, max(batch_size, 16), options.exact_cache_gib * 2**30)
    logger.info("exact KL over %s; dense states kept at %d of %d layer boundaries; teacher %s", "chunks of the "
                "output head" if scorer.chunked_head else "full logits", len(scorer.boundaries),
                handle.num_layers - 1, "log-probabilities kept" if scorer.log_probs else "head applied per cut")
    return scorer


def checked(scorer: ExactKL) -> Callable[[list[Candidate]], list[float]]:
    """``scorer``, refusing a KL that is not finite."""

    def exact(candidates: list[Candidate]) -> list[float]:
        losses = scorer(candidates)
        if not all(math.isfinite(loss) for loss in losses):
            raise LayercutError("the KL of a cut is not finite: the model's outputs overflow; load it in float32 "
                                "(--dtype float32)")
        return losses

    return exact


def cut_kl(handle: Handle, windows: torch.Tensor, segments: Sequence[Segment], options: SearchOptions,
           batch_size: int = 4) -> float:
    """The KL(dense ‖ cut) of the cut ``segments`` on calibration ``windows`` ``[N, T]`` that a search reports:
    the shared exact scorer's, as the gate's read-out and the exact oracle score every cut, so a cut reports the
    same KL whichever method chose it."""
    return checked(exact_scorer(handle, windows, options, batch_size))([tuple(map(tuple, segments))])[0]


def search_exhaustive(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions,
                      batch_size: int = 4, seed: int = 0, progress=None, scorer: ExactKL | None = None
                      ) -> SearchResult:
    """The exact oracle: the hard-cut KL of every cut of ``remove`` layers in at most ``options.segments``
    segments on ``windows``. The cost is estimated from two probe cuts, the one that runs the most layers and the one
    that runs the fewest (:func:`cost_model`); past ``options.exhaustive_budget`` seconds the search is refused
    before the rest runs."""
    started = time.perf_counter()
    scorer = scorer or exact_scorer(handle, windows, options, batch_size)
    exact = checked(scorer)
    candidates = cuts(handle.num_layers, remove, options.segments)
    probes = [candidates[0], candidates[-1]] if len(candidates) > 1 else candidates[:1]
    seconds, probed = [], {}
    for probe in probes:  # the cut that runs the most layers, and the one that runs the fewest
        started_probe = time.perf_counter()
        probed[probe] = exact([probe])[0]
        seconds.append(time.perf_counter() - started_probe)
    per_cut, per_layer = cost_model([scorer.layers_run(c) for c in probes], seconds)
    estimate = sum(per_cut + per_layer * scorer.layers_run(c) for c in candidates[1:-1])
    if estimate > options.exhaustive_budget:
        raise LayercutError(
            f"--method exhaustive would score {len(candidates):,} cuts of {remove} layers in at most "
            f"{options.segments} segment(s), an estimated {estimate:,.0f} s here, over --exhaustive-budget "
            f"{options.exhaustive_budget:,.0f} s; raise the budget, lower --segments, or use --method clp")
    logger.info("exhaustive: %d cuts, estimated %.0f s", len(candidates), estimate)
    scored = dict(zip(candidates[1:-1], exact(candidates[1:-1]))) | probed
    losses = [scored[c] for c in candidates]
    best = min(range(len(candidates)), key=losses.__getitem__)
    return SearchResult("exhaustive", list(candidates[best]), losses[best], time.perf_counter() - started,
                        len(candidates), [], {candidate_key(c): v for c, v in zip(candidates, losses)})


def search_gate(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int = 4,
                seed: int = 0, progress=None, scorer: ExactKL | None = None) -> SearchResult:
    """Choose ``remove`` layers to cut in at most ``options.segments`` segments with the concave gate (CLP) on the
    calibration windows ``[N, T]``.

    Each gate step draws ``options.gate_windows`` windows (their first ``gate_context`` tokens, and
    ``gate_positions`` positions of those; all for 0) with a generator seeded by ``seed``, and compares the gated
    model with the dense outputs computed once by the shared exact scorer. Model weights are frozen; only the gate parameters train; ``gate_checkpointing``
    recomputes each layer in backward instead of storing its activations. With several segments the exact best
    single segment (and, from three segments, the best cut the gate finds with one segment fewer) is among the
    read-out's candidates, so the result is never worse than a cut of fewer segments. ``progress`` is called with 1
    after each gate step.
    """
    started = time.perf_counter()
    options = gate_settings(options)
    model, layers = handle.model, handle.layers
    scorer = scorer or exact_scorer(handle, windows, options, batch_size)
    exact = checked(scorer)
    known = fewer_segments(handle, windows, remove, options, batch_size, seed, scorer)
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with gated(layers) as set_gates, \
                (checkpointed_layers(model, layers) if options.gate_checkpointing else contextlib.nullcontext()):
            objective = gate_objective(scorer, model, windows, set_gates, options, seed)
            read_out, screen = exact_readers(scorer, exact, set_gates, options, windows.shape[0])
            result = search_notches(objective, read_out, handle.num_layers, remove, options, progress, known, screen)
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    result.seconds = time.perf_counter() - started
    return result


def fewer_segments(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int,
                   seed: int, scorer: ExactKL) -> dict[Candidate, float]:
    """The exact KL of every cut scored by the search for one segment fewer (exhaustive for one segment, the gate
    from two); empty for one segment."""
    if options.segments <= 1:
        return {}
    fewer = options.replace(segments=options.segments - 1, gate_steps=options.gate_steps)
    previous = (search_exhaustive if options.segments == 2 else search_gate)(
        handle, windows, remove, fewer, batch_size, seed, None, scorer)
    return {parse_key(key): value for key, value in previous.landscape.items()}


def gate_objective(scorer: ExactKL, model, windows: torch.Tensor, set_gates: Callable, options: SearchOptions,
                   seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``objective(gates [R, L]) -> [R]``: the mean KL of each gated profile to the dense model on
    ``options.gate_windows`` calibration windows drawn by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    step_windows = min(options.gate_windows, windows.shape[0])
    # A causal model's outputs at the first C positions do not depend on the tokens after them: a step on the
    # windows' first C tokens is the KL of the whole window restricted to those positions, at C/T of the cost.
    length = options.gate_context if 0 < options.gate_context < windows.shape[1] else windows.shape[1]
    positions = options.gate_positions if 0 < options.gate_positions < length else 0

    def objective(gates: torch.Tensor) -> torch.Tensor:
        picks = torch.randint(0, windows.shape[0], (step_windows,), generator=generator)
        batch = windows[picks, :length]
        at = torch.randperm(length, generator=generator)[:positions].sort().values if positions else None
        if at is None and length < windows.shape[1]:
            at = torch.arange(length)
        if scorer.chunked_head:
            kl = gated_kl(scorer, set_gates, gates, picks, length, at)
        else:
            with torch.no_grad():
                set_gates(None)
                teacher = outputs_of(model, batch, False)
            set_gates(gates)  # stays installed until the next call: checkpointed layers rerun it
            kl = kl_rows(model, teacher, outputs_of(model, batch.repeat(gates.shape[0], 1), False), False)
        return kl.view(gates.shape[0], batch.shape[0]).mean(dim=1).cpu()

    return objective


def exact_readers(scorer: ExactKL, exact: Callable[[list[Candidate]], list[float]], set_gates: Callable,
                  options: SearchOptions, num_windows: int):
    """``(read_out, screen)``: the exact KL of hard cuts on every calibration window, and (None unless
    ``options.gate_screen`` is below ``num_windows``) on the first ``gate_screen`` windows; both remove the soft
    gates first, so the last ones do not act under their passes."""

    def read_out(candidates: list[Candidate]) -> list[float]:
        set_gates(None)
        return exact(candidates)

    screen = None
    if 0 < options.gate_screen < num_windows:
        screener = checked(lambda batch: scorer(batch, options.gate_screen))

        def screen(candidates: list[Candidate]) -> list[float]:
            set_gates(None)
            return screener(candidates)

    return read_out, screen


def gated_kl(scorer: ExactKL, set_gates: Callable, gates: torch.Tensor, picks: torch.Tensor, length: int,
             at: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row token KL ``[R·b]`` of the model under soft ``gates`` ``[R, L]`` (installed with ``set_gates`` of
    :func:`layercut.forward.gated`) against the dense outputs ``scorer`` keeps, on the first ``length`` tokens of
    calibration windows ``picks`` ``[b]``, at positions ``at`` of them (all when None).

    The layers before every profile's notch (:func:`settled_layers`) compute the dense states, so the pass starts
    from the dense state kept at the last boundary before them and the gates act, and gradients flow, from the
    first layer a gate opens. The gates stay installed afterwards: checkpointed layers rerun them in backward.
    """
    model = scorer.handle.model
    first = settled_layers(gates)
    boundary = scorer.start(first)
    state = scorer.dense_rows(boundary, picks, length).repeat(gates.shape[0], 1, 1) if boundary else None
    set_gates(gates, first)
    batch = scorer.windows[picks, :length].repeat(gates.shape[0], 1)
    with scorer.from_boundary(boundary, state):
        student = final_hidden(model, batch)
    if at is None and length < scorer.windows.shape[1]:
        at = torch.arange(length)
    student = student if at is None else student[:, at.to(student.device)]
    return scorer.kl(scorer.teacher_rows(picks, at), student)


def parse_key(key: str) -> Candidate:
    """The cut of a :func:`candidate_key`."""
    return tuple(tuple(int(part) for part in segment.split(":")) for segment in key.split())

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

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layercut.errors import LayercutError
from layercut.evaluate import batches
from layercut.layers import Segment, find_decoder_layers, merge_adjacent, text_config
from layercut.load import model_device

logger = logging.getLogger(__name__)

Candidate = tuple[Segment, ...]


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


def hard_gates(candidates: Sequence[Candidate], num_layers: int) -> torch.Tensor:
    """Gate values ``[R, L]``: 0 inside each candidate's segments, 1 elsewhere."""
    gates = torch.ones(len(candidates), num_layers)
    for row, segments in enumerate(candidates):
        for start, end in segments:
            gates[row, start:end] = 0
    return gates


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per-row mean over tokens of KL(teacher ‖ student) of next-token distributions, in nats.

    ``teacher_logits`` ``[b, T, V]``, ``student_logits`` ``[R·b, T, V]`` (R profiles stacked row-wise, each over
    the same b windows). Returns ``[R·b]``. Works in float32 over chunks of ``chunk`` positions so no full-size
    float32 copy of the logits exists.
    """
    repeats = student_logits.shape[0] // teacher_logits.shape[0]
    total = student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
    length = student_logits.shape[1]
    for start in range(0, length, chunk):
        log_p = F.log_softmax(teacher_logits[:, start : start + chunk].float(), dim=-1).repeat(repeats, 1, 1)
        log_q = F.log_softmax(student_logits[:, start : start + chunk].float(), dim=-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum(dim=(-1, -2))
    return total / length


def temperature(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Geometric annealing from ``tau_start`` at step 0 to ``tau_end`` at the last step."""
    if steps <= 1:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (step / (steps - 1))


def initial_starts(num_layers: int, width: int, profiles: int, notches: int) -> torch.Tensor:
    """``[R, K]`` starting positions: notch k of profile r sits in the k-th of K equal depth bands, at a
    profile-specific offset, so the R profiles together sweep the whole depth."""
    band = num_layers / notches
    offsets = (torch.arange(profiles, dtype=torch.float32) + 0.5) / profiles  # [R]
    starts = torch.arange(notches, dtype=torch.float32) * band + offsets.unsqueeze(1) * max(band - width, 0.0)
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


def search_notches(objective: Callable[[torch.Tensor], torch.Tensor],
                   hard_objective: Callable[[list[Candidate]], list[float]],
                   num_layers: int, remove: int, notches: int = 1, profiles: int = 0, steps: int = 60,
                   lr: float = 0.2, tau_start: float = 1.0, tau_end: float = 0.05, progress=None) -> SearchResult:
    """Train ``profiles`` gate profiles of ``notches`` notches each (together removing ``remove`` layers).

    ``objective(gates [R, L]) -> [R]`` is the differentiable loss of each profile (KL on a calibration batch);
    ``hard_objective(candidates) -> [float]`` the exact loss of hard cuts on the whole calibration set. Each
    profile starts at a different depth, so together they cover the depth's basins; the read-out rounds every
    profile to whole layers, scores those cuts and their neighbours exactly and hill-climbs to a local optimum
    of the hard loss.
    """
    started = time.perf_counter()
    if profiles <= 0:
        profiles = max(1, math.ceil((num_layers - remove + 1) / max(3, remove // 2)))
    starts = initial_starts(num_layers, remove // notches, profiles, notches).requires_grad_(True)
    width_logits = torch.zeros(profiles, notches, requires_grad=True)
    parameters = [starts, width_logits] if notches > 1 else [starts]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    trajectory = []
    for step in range(steps):
        tau = temperature(step, steps, tau_start, tau_end)
        widths = remove * torch.softmax(width_logits, dim=-1)
        gates = 1 - notch_mask(starts, widths, num_layers, tau)
        losses = objective(gates)
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
        readouts.append(tuple((k * (num_layers // notches), k * (num_layers // notches) + remove // notches)
                              for k in range(notches)))
    known: dict[Candidate, float] = {}
    around = [n for c in readouts for n in neighbours(c, num_layers)]
    best, best_kl = refine(readouts + around, hard_objective, num_layers, known)
    return SearchResult("clp", list(best), best_kl, time.perf_counter() - started, len(known), trajectory,
                        {_key(c): v for c, v in known.items()})


def exhaustive(hard_objective: Callable[[list[Candidate]], list[float]], num_layers: int, remove: int) -> SearchResult:
    """Exact loss of every contiguous window of ``remove`` layers; the reference the gate is judged against."""
    started = time.perf_counter()
    candidates = [((start, start + remove),) for start in range(num_layers - remove + 1)]
    losses = hard_objective(candidates)
    best = min(range(len(candidates)), key=losses.__getitem__)
    return SearchResult("exhaustive", list(candidates[best]), losses[best], time.perf_counter() - started,
                        len(candidates), [], {_key(c): v for c, v in zip(candidates, losses)})


def _key(candidate: Candidate) -> str:
    return " ".join(f"{s}:{e}" for s, e in candidate)


# ----------------------------------------------------------------------------------------------- model plumbing


@contextlib.contextmanager
def gated(model, layers_path: str | None = None):
    """Install gate hooks on every decoder layer; yields a setter taking gates ``[R, L]`` (or None = dense).

    With R profiles the batch must hold R stacked copies of the windows; row r·b + j uses profile r.
    """
    _, layers = find_decoder_layers(model, layers_path)
    state: dict[str, torch.Tensor | None] = {"gates": None}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            gates = state["gates"]
            if gates is None:
                return output
            out = output[0] if isinstance(output, tuple) else output
            # on a model split over devices the layer's input may still sit on the previous layer's device
            hidden = (args[0] if args else kwargs["hidden_states"]).to(out.device)
            per_row = gates[:, index].to(device=out.device, dtype=out.dtype)
            per_row = per_row.repeat_interleave(out.shape[0] // per_row.shape[0]).view(-1, 1, 1)
            mixed = hidden + per_row * (out - hidden)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def set_gates(gates: torch.Tensor | None) -> None:
        state["gates"] = gates

    try:
        yield set_gates
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def checkpointed_layers(model, layers):
    """Recompute each decoder layer during backward instead of storing its activations (transformers'
    gradient checkpointing, non-reentrant).

    transformers checkpoints a layer only while ``layer.training`` is true, so exactly those flags are set; every
    submodule stays in eval mode, so dropout stays off. Gate hooks run inside the checkpointed call and read the
    gates again on recompute: the gates must stay installed until backward has run.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LayercutError(f"{type(model).__name__} does not support gradient checkpointing; "
                            "run the gate search without --gate-checkpointing")
    flags = [layer.training for layer in layers]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.training = flag
        model.gradient_checkpointing_disable()


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, T, V]`` for ``input_ids`` ``[b, T]`` placed on the model's input device."""
    return model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states ``[b, T, H]`` the output head reads (after the final norm), without the logits."""
    return model.base_model(input_ids=input_ids.to(model_device(model)), use_cache=False).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, t, V]`` of final hidden states ``[b, t, H]``: the output head, then the config's final logit
    soft-capping when it has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_reproduces_logits(model, input_ids: torch.Tensor) -> bool:
    """Whether :func:`head_logits` of :func:`final_hidden` equals the model's own logits on ``input_ids``.

    A model that does more after its output head than soft-capping (a logit scale, say) fails this check and
    is scored on its full logits instead.
    """
    with torch.no_grad():
        full = logits_of(model, input_ids).float()
        try:
            split = head_logits(model, final_hidden(model, input_ids)).float()
        except (AttributeError, TypeError):
            return False
    return split.shape == full.shape and torch.allclose(split.to(full.device), full, rtol=1e-3,
                                                         atol=1e-3 * float(full.abs().max()))


def _chunk_kl(model, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher = head_logits(model, teacher_hidden)
    return token_kl(teacher, head_logits(model, student_hidden), chunk=teacher_hidden.shape[1])


def head_kl(model, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, budget: int = 2**25) -> torch.Tensor:
    """:func:`token_kl` of the logits of final hidden states, computed over chunks of positions.

    ``teacher_hidden`` ``[b, T, H]``, ``student_hidden`` ``[R·b, T, H]``; returns ``[R·b]``. Each chunk holds at
    most ``budget`` logits per copy, so the ``[R·b, T, V]`` logits never exist whole; with gradients on, each
    chunk is recomputed in backward (checkpointed) rather than kept.
    """
    rows, length = student_hidden.shape[:2]
    vocab = int(getattr(model.get_output_embeddings(), "out_features", 0) or text_config(model).vocab_size)
    chunk = max(1, budget // (rows * vocab))
    total = 0.0
    for start in range(0, length, chunk):
        teacher, student = teacher_hidden[:, start : start + chunk], student_hidden[:, start : start + chunk]
        if torch.is_grad_enabled() and student.requires_grad:
            piece = checkpoint(_chunk_kl, model, teacher, student, use_reentrant=False)
        else:
            piece = _chunk_kl(model, teacher, student)
        total = total + piece * teacher.shape[1]
    return total / length


def outputs_of(model, input_ids: torch.Tensor, chunked_head: bool) -> torch.Tensor:
    """Final hidden states (``chunked_head``) or logits: what :func:`kl_rows` compares."""
    return final_hidden(model, input_ids) if chunked_head else logits_of(model, input_ids)


def kl_rows(model, teacher: torch.Tensor, student: torch.Tensor, chunked_head: bool) -> torch.Tensor:
    """Per-row token KL(teacher ‖ student) ``[R·b]`` of :func:`outputs_of` values."""
    return head_kl(model, teacher, student) if chunked_head else token_kl(teacher, student)


def hard_kl(model, windows: torch.Tensor, candidates: Sequence[Candidate], batch_size: int = 4,
            layers_path: str | None = None, rows_per_pass: int = 16, chunked_head: bool | None = None) -> list[float]:
    """Mean token KL(dense ‖ cut) over ``windows`` ``[N, T]`` for each candidate cut (gates exactly 0/1).

    The dense teacher is the same model with gates off, computed once per batch of windows. ``chunked_head``
    (None = check with :func:`head_reproduces_logits`) keeps only final hidden states and applies the output
    head chunk by chunk.
    """
    num_layers = len(find_decoder_layers(model, layers_path)[1])
    if chunked_head is None:
        chunked_head = head_reproduces_logits(model, windows[:1, :16])
    gates = hard_gates(candidates, num_layers)
    totals = torch.zeros(len(candidates))
    with torch.no_grad(), gated(model, layers_path) as set_gates:
        for batch in batches(windows, batch_size):
            set_gates(None)
            teacher = outputs_of(model, batch, chunked_head)
            group = max(1, rows_per_pass // batch.shape[0])
            for first in range(0, len(candidates), group):
                chunk = gates[first : first + group]
                set_gates(chunk)
                student = outputs_of(model, batch.repeat(chunk.shape[0], 1), chunked_head)
                kl = kl_rows(model, teacher, student, chunked_head).view(chunk.shape[0], batch.shape[0]).sum(dim=1)
                totals[first : first + group] += kl.cpu()
            set_gates(None)
    return (totals / windows.shape[0]).tolist()


def search_segments(model, windows: torch.Tensor, remove: int, method: str = "clp", notches: int = 1,
                    profiles: int = 0, steps: int = 60, lr: float = 0.2, tau_start: float = 1.0,
                    tau_end: float = 0.05, step_windows: int = 4, batch_size: int = 4, seed: int = 0,
                    layers_path: str | None = None, progress=None, checkpointing: bool = False) -> SearchResult:
    """Choose ``remove`` layers to cut by the concave gate (``clp``) or by trying every window (``exhaustive``).

    ``windows`` ``[N, T]`` are the calibration windows; each gate step uses ``step_windows`` of them, drawn with
    a generator seeded by ``seed``. Model weights are frozen; only the gate parameters train. The KL is taken
    over chunks of positions from final hidden states when the output head alone makes the logits (checked
    once), and ``checkpointing`` recomputes each layer in backward instead of storing its activations.
    """
    _, layers = find_decoder_layers(model, layers_path)
    num_layers = len(layers)
    chunked_head = head_reproduces_logits(model, windows[:1, :16])
    logger.info("KL over %s", "chunks of the output head" if chunked_head else "full logits")

    def hard_objective(candidates: list[Candidate]) -> list[float]:
        return hard_kl(model, windows, candidates, batch_size, layers_path, chunked_head=chunked_head)

    if method == "exhaustive":
        return exhaustive(hard_objective, num_layers, remove)
    generator = torch.Generator().manual_seed(seed)
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)

    try:
        with gated(model, layers_path) as set_gates, \
                (checkpointed_layers(model, layers) if checkpointing else contextlib.nullcontext()):

            def objective(gates: torch.Tensor) -> torch.Tensor:
                picks = torch.randint(0, windows.shape[0], (min(step_windows, windows.shape[0]),), generator=generator)
                batch = windows[picks]
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

            result = search_notches(objective, exact, num_layers, remove, notches, profiles, steps, lr,
                                    tau_start, tau_end, progress)
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    return result

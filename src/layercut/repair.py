"""The repair-aware selection: candidate cuts by exact KL, each repaired cheaply (a short endpoint heal or a
training-free linear patch) and scored on calibration windows held out from the repair's own; the best one wins.

The candidates are never cut: removed layers are skipped (:func:`layercut.forward.replaced_layers`, exactly the cut
model's function), and the few weights a repair changes are put back after each candidate, so the search keeps one
copy of the model. Indices are the original model's, 0-based and half-open.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from layercut import heal, replacement
from layercut.data import shares_no_run
from layercut.errors import LayercutError
from layercut.forward import (
    ExactKL,
    batches,
    checkpointed_layers,
    final_hidden,
    frozen,
    model_device,
    replaced_layers,
)
from layercut.gate import (
    SearchResult,
    candidate_key,
    checked,
    cuts,
    exact_scorer,
    gate_settings,
    parse_key,
    refine_beam,
    search_gate,
)
from layercut.layers import Candidate, Handle, kept_layers

if TYPE_CHECKING:
    from layercut.config import SearchOptions

logger = logging.getLogger(__name__)
SEVERAL_SEGMENTS = 4  # cuts of each number of segments above one that the repair method screens by default


def screened_per_number(segments: int, top: int | None) -> int | None:
    """How many cuts of ``segments`` segments the repair method screens, those of lowest exact KL: ``top`` when
    given, else every contiguous cut (``None``) and :data:`SEVERAL_SEGMENTS` of each larger number."""
    return top if top is not None else (None if segments == 1 else SEVERAL_SEGMENTS)


def candidate_cuts(kl: dict[Candidate, float], num_layers: int, remove: int, top: int | None) -> list[Candidate]:
    """The cuts the repair method screens, from the exact KL of every cut considered (``kl``): for each number of
    segments among them, the ``top`` with the lowest KL (``None``: every contiguous cut and the
    :data:`SEVERAL_SEGMENTS` lowest of each larger number), then the tail cut ``[L − n, L)`` when it is not one of
    them. Order: by number of segments, then by KL."""
    chosen: list[Candidate] = []
    for count in sorted({len(c) for c in kl}):
        chosen += sorted((c for c in kl if len(c) == count), key=kl.__getitem__)[:screened_per_number(count, top)]
    tail = ((num_layers - remove, num_layers),)
    return chosen if tail in chosen else [*chosen, tail]


def finalists(screened: dict[Candidate, float], count: int) -> list[Candidate]:
    """The ``count`` candidates of lowest screened score of each number of segments (all of them when there are no
    more), in order of score. Per number: a short heal trains two endpoint layers per segment, so cuts of more
    segments lead after the screen even where they heal worse in full (bench/results/repair-pick-h100)."""
    chosen = [c for number in sorted({len(c) for c in screened})
              for c in sorted((c for c in screened if len(c) == number), key=screened.__getitem__)[:count]]
    return sorted(chosen, key=screened.__getitem__)


def extrapolated(first: tuple[int, float], second: tuple[int, float], horizon: int) -> float:
    """The held-out KL after ``horizon`` heal steps on the power law through two (steps, KL) points, ``first``
    before ``second``: ``kl₂ · (horizon / steps₂) ** (log(kl₂ / kl₁) / log(steps₂ / steps₁))``. The second KL
    itself when ``horizon`` is not beyond it or the points do not define a law (equal steps, a KL that is not
    finite and positive)."""
    (steps_1, kl_1), (steps_2, kl_2) = first, second
    if horizon <= steps_2 or steps_2 <= steps_1 or not all(math.isfinite(k) and k > 0 for k in (kl_1, kl_2)):
        return kl_2
    slope = math.log(kl_2 / kl_1) / math.log(steps_2 / steps_1)
    return kl_2 * (horizon / steps_2) ** slope


def endpoint_layers(candidate: Candidate, num_layers: int) -> list[int]:
    """Original indices of the kept layers just before and just after each segment of ``candidate`` (fewer at an
    edge): the layers the endpoints heal trains and, before each segment, the one a linear patch folds into."""
    keep = kept_layers(list(candidate), num_layers)
    found = set()
    for start, end in candidate:
        found.update([k for k in keep if k < start][-1:] + [k for k in keep if k >= end][:1])
    return sorted(found)


def split_windows(windows: torch.Tensor, shingle: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows ``[N, T]`` in two: the first half fits or trains the repair, the second half, less
    any window that shares a run of ``shingle`` tokens with the first, scores it. LayercutError when fewer than two
    windows would score."""
    half = windows.shape[0] // 2
    train, rest = windows[:half], windows[half:]
    held = rest[shares_no_run(rest, train, shingle)]
    if half < 1 or held.shape[0] < 2:
        raise LayercutError(f"the repair method needs calibration windows to repair on and at least two others to "
                            f"score on; {windows.shape[0]} window(s) leave {held.shape[0]}: raise --calib-windows")
    return train, held


@contextlib.contextmanager
def restored(modules: Sequence[torch.nn.Module], host: bool = False):
    """Within the context the ``modules`` may change; their weights are put back afterwards (from copies kept in
    host memory with ``host``)."""
    saved = [{name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()} if host
             else copy.deepcopy(module.state_dict()) for module in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, state in zip(modules, saved):
                module.load_state_dict(state)


def returns_tuple(handle: Handle, windows: torch.Tensor) -> bool:
    """Whether the model's decoder layers return tuples (transformers 4.x) rather than tensors."""
    found = []
    hook = handle.layers[0].register_forward_hook(lambda module, args, output: found.append(isinstance(output, tuple)))
    try:
        with torch.no_grad():
            handle.model(input_ids=windows[:1, :4].to(model_device(handle.model)), use_cache=False)
    finally:
        hook.remove()
    return found[0]


def held_out_kl(handle: Handle, windows: torch.Tensor, teacher: heal.TeacherTargets, batch_size: int) -> float:
    """Mean token KL(dense top-k ‖ model) of the handle's model (as it runs now) over ``windows`` ``[N, T]``."""
    total, device = 0.0, model_device(handle.model)
    with torch.no_grad():
        for start, batch in zip(range(0, windows.shape[0], batch_size), batches(windows, batch_size)):
            logits = handle.model(input_ids=batch.to(device), use_cache=False).logits
            rows = slice(start, start + batch.shape[0])
            total += float(heal.top_k_kl(logits, teacher.log_probs[rows].to(device),
                                         teacher.indices[rows].to(device))) * batch.shape[0]
    return total / windows.shape[0]


def short_heal(handle: Handle, trained: list[int], windows: torch.Tensor, teacher: heal.TeacherTargets, steps: int,
               learning_rate: float, batch: int, seed: int, lean: bool = False) -> bool:
    """``steps`` AdamW steps of the layers ``trained`` on the top-k KL to the dense model over ``windows``, as the
    endpoints heal does; False (and the steps stop) when the loss is not finite. ``lean``: each decoder layer is
    recomputed in backward instead of its activations kept, and the output head and KL run over chunks of positions
    (:func:`layercut.heal.chunked_top_k_kl`)."""
    model = handle.model
    model.requires_grad_(False)
    parameters = [p for index in trained for p in handle.layers[index].parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0, foreach=False if lean else None)
    generator, device = torch.Generator().manual_seed(seed), model_device(model)
    try:
        with checkpointed_layers(model, handle.layers) if lean else contextlib.nullcontext():
            for _ in range(steps):
                picks = torch.randint(0, windows.shape[0], (min(batch, windows.shape[0]),), generator=generator)
                ids, values, indices = (windows[picks].to(device), teacher.log_probs[picks].to(device),
                                        teacher.indices[picks].to(device))
                if lean:
                    loss = heal.chunked_top_k_kl(model, final_hidden(model, ids), values, indices)
                else:
                    loss = heal.top_k_kl(model(input_ids=ids, use_cache=False).logits, values, indices)
                if not math.isfinite(loss.item()):
                    return False
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        frozen(model)  # else each candidate's endpoint gradients outlive it
    return True


def fold_patch(handle: Handle, candidate: Candidate, windows: torch.Tensor, proxy: str, batch_size: int) -> bool:
    """Fold the linear patch ``proxy`` (``lsq``, ``linearpatch``, ``replaceme``), fitted on ``windows`` of the dense
    model, into the layer before each segment of ``candidate``; False when it does not fold into this model or cut
    (the cut is then scored unpatched)."""
    collect = heal.HEALS[proxy].collect
    try:
        maps = collect(handle, list(candidate), heal.HealData(windows), None, batch_size)
    except LayercutError as error:
        logger.info("repair: %s does not apply to %s (%s); scored without it", proxy, candidate_key(candidate), error)
        return False
    for (start, _), transform in maps.items():
        replacement.fold_map(replacement.output_projection(handle.layers[start - 1]), transform)
    return True


def repaired_kl(handle: Handle, candidate: Candidate, data: dict, options: SearchOptions, batch_size: int,
                seed: int, steps: int) -> float:
    """The held-out KL of ``candidate`` after its cheap repair (``options.repair_proxy``; ``steps`` of the short
    heal for ``endpoints``); the model is unchanged afterwards."""
    removed = {i for start, end in candidate for i in range(start, end)}
    ends = endpoint_layers(candidate, handle.num_layers)
    lean = options.gate_checkpointing
    with restored([handle.layers[i] for i in ends], host=lean):
        if options.repair_proxy != "endpoints":
            fold_patch(handle, candidate, data["train"], options.repair_proxy, batch_size)
        with replaced_layers(handle.layers, removed, tuple_output=data["tuple"]):
            if options.repair_proxy == "endpoints" and not short_heal(
                    handle, ends, data["train"], data["teacher_train"], steps,
                    heal.HEALS["endpoints"].learning_rate, min(8, data["train"].shape[0]), seed, lean):
                return math.inf
            return held_out_kl(handle, data["held"], data["teacher_held"], batch_size)


def scored_cuts(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int,
                seed: int, scorer: ExactKL | None = None) -> tuple[dict[Candidate, float], int]:
    """The exact KL of the cuts the repair method chooses among, and how many cuts were scored: every contiguous
    cut (exhaustive) or, with one segment and ``options.repair_candidates`` set, only its :func:`candidate_cuts`
    by their KL on the first ``--gate-screen`` windows (every cut's pass on all windows is what the one-segment
    selection costs most at 8B, bench/results/grid-repair4-h200/replay-budget.md); with ``options.segments`` above
    1 every cut the concave gate's search reads out exactly on its way (:func:`layercut.gate.search_gate`;
    enumerating every cut of several segments grows as L², L³, …), widened for each number of segments by a
    hill-climb of the candidates it screens (:func:`screened_per_number`) together
    (:func:`layercut.gate.refine_beam`). All use one exact scorer (``scorer``, or one made here): the dense model
    runs once over ``windows``. The gate's search scores every contiguous cut itself (its search for one segment
    fewer), so only those it did not are scored here."""
    scorer = scorer or exact_scorer(handle, windows, options, batch_size)
    exact = checked(scorer)
    every = cuts(handle.num_layers, remove, 1)
    if options.segments == 1:
        screen = gate_settings(options).gate_screen
        if options.repair_candidates is None or not 0 < screen < windows.shape[0]:
            return dict(zip(every, exact(every))), len(every)
        rough = dict(zip(every, checked(lambda batch: scorer(batch, screen))(every)))
        chosen = candidate_cuts(rough, handle.num_layers, remove, options.repair_candidates)
        return dict(zip(chosen, exact(chosen))), len(every) + len(chosen)
    found = search_gate(handle, windows, remove, options, batch_size, seed, scorer=scorer)
    kl = {parse_key(key): value for key, value in found.landscape.items()}
    missing = [cut for cut in every if cut not in kl]
    kl.update(zip(missing, exact(missing)))
    widened = sum(refine_beam(kl, exact, handle.num_layers, count,
                              screened_per_number(count, options.repair_candidates))
                  for count in range(2, options.segments + 1))
    return kl, found.evaluations + len(missing) + widened


def repair_data(handle: Handle, windows: torch.Tensor, batch_size: int) -> dict:
    """What scoring candidates needs, once: the calibration ``windows`` split (:func:`split_windows`) and the dense
    model's top-k targets on both halves."""
    train, held = split_windows(windows)
    top_k = min(64, handle.model.get_output_embeddings().weight.shape[0])
    return {"train": train, "held": held, "tuple": returns_tuple(handle, windows),
            "teacher_train": heal.teacher_targets(handle.model, train, top_k, batch_size),
            "teacher_held": heal.teacher_targets(handle.model, held, top_k, batch_size)}


def repaired_kls(handle: Handle, data: dict, candidates: Sequence[Candidate], options: SearchOptions,
                 batch_size: int = 4, seed: int = 0, progress=None, kl: dict | None = None,
                 steps: int | None = None) -> dict[Candidate, float]:
    """Each of ``candidates`` scored as the repair-aware selection scores it: repaired cheaply on the first half of
    the calibration windows (their :func:`repair_data`) for ``steps`` short-heal steps (default
    ``options.repair_steps``) and measured by its KL to the dense model on the held-out half
    (:func:`repaired_kl`). ``kl`` (optional) holds their exact KL before repair, for the log."""
    steps = options.repair_steps if steps is None else steps
    scores = {}
    for candidate in candidates:
        scores[candidate] = repaired_kl(handle, candidate, data, options, batch_size, seed, steps)
        before = f"KL {kl[candidate]:.4f} before repair, " if kl and candidate in kl else ""
        how = f"{steps} steps" if options.repair_proxy == "endpoints" else options.repair_proxy
        logger.info("repair: %s, %s%.4f after (%s)", candidate_key(candidate), before, scores[candidate], how)
        if progress is not None:
            progress(1)
    return scores


def search_repair(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int = 4,
                  seed: int = 0, progress=None, scorer: ExactKL | None = None) -> SearchResult:
    """The repair-aware selection on calibration ``windows`` ``[N, T]``, by successive halving (``scorer``: the
    exact scorer of the same windows, when a caller shares one between searches): the exact KL of the
    cuts of ``remove`` layers that :func:`scored_cuts` considers (on all windows); :func:`candidate_cuts` of them,
    each scored by its KL to the dense model on the held-out half of the windows after a short repair
    (:func:`repaired_kl`, ``options.repair_screen_steps`` steps); the ``options.repair_finalists`` lowest of each
    number of segments (:func:`finalists`) repaired again from the start for ``options.repair_steps`` steps; the
    lowest of those after ``options.repair_horizon`` steps, extrapolated from the two (:func:`extrapolated`),
    wins (a lone finalist wins unhealed again). A linear-patch proxy has no steps: every candidate is patched once
    and the lowest wins; it is refused at once (LayercutError) where it does not fold into the model's layers (a
    norm after the MLP, as in Gemma-2 and -3), since every candidate would then be scored by its plain KL.
    ``progress`` (optional) is called with 1 per repair. ``landscape`` holds the exact KL of every cut;
    ``trajectory`` one row per candidate with its screened and (finalists) repaired and extrapolated KL."""
    started = time.perf_counter()
    if options.repair_proxy != "endpoints":  # else every candidate would be scored unpatched, by its plain KL
        replacement.check_foldable(handle, 0, windows, f"use --repair-proxy endpoints, not {options.repair_proxy}")
    kl, evaluations = scored_cuts(handle, windows, remove, options, batch_size, seed, scorer)
    chosen = candidate_cuts(kl, handle.num_layers, remove, options.repair_candidates)
    data = repair_data(handle, windows, batch_size)
    stepped = options.repair_proxy == "endpoints"
    logger.info("repair: exact KL of %d cuts; screening %d of them", len(kl), len(chosen))
    screened = repaired_kls(handle, data, chosen, options, batch_size, seed, progress, kl,
                            steps=options.repair_screen_steps if stepped else None)
    if stepped:
        leading = finalists(screened, options.repair_finalists)
        # a lone finalist wins whatever its longer heal gives: it is not healed again
        final = repaired_kls(handle, data, leading, options, batch_size, seed, progress, kl) if leading[1:] else {}
        ahead = ({c: extrapolated((options.repair_screen_steps, screened[c]), (options.repair_steps, value),
                                  options.repair_horizon) for c, value in final.items()} if final
                 else {leading[0]: screened[leading[0]]})
    else:  # a patch is fitted once: its screen is its score
        final = ahead = screened
    best = min(ahead, key=ahead.__getitem__)
    rows = [{"cut": candidate_key(c), "kl": kl[c], "screened_kl": screened[c], "repaired_kl": final.get(c)}
            | ({"extrapolated_kl": ahead.get(c) if final else None} if stepped else {}) for c in chosen]
    return SearchResult("repair", list(best), kl[best], time.perf_counter() - started,
                        evaluations + len(chosen) + len(final) * stepped, rows,
                        {candidate_key(c): value for c, value in kl.items()})

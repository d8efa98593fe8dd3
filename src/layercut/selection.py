"""The search stage: which segments to cut, given by the user or chosen by a selection method.

:data:`METHODS` is the one registry of selection methods; the CLI's choices, the docs and the dispatch read it.
A new method is one function with the signature of :func:`layercut.gate.search_gate` plus one entry here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layercut import repair
from layercut.criteria import CRITERIA, select_by_criterion
from layercut.errors import LayercutError
from layercut.gate import (
    SearchResult,
    candidate_key,
    checked,
    cut_kl,
    cuts,
    exact_scorer,
    gate_settings,
    search_exhaustive,
    search_gate,
)
from layercut.layers import (
    Handle,
    Segment,
    keeps_layer_pattern,
    parse_segment,
    text_config,
    validate_segments,
)

if TYPE_CHECKING:
    from layercut.config import SearchOptions


@dataclass(frozen=True)
class Method:
    """A selection method: ``search(handle, windows, remove, options, batch_size, seed, progress)`` and its help."""

    search: Callable[..., SearchResult]
    help: str


def _criterion(name: str) -> Callable[..., SearchResult]:
    def search(handle: Handle, windows: torch.Tensor, remove: int, options: SearchOptions, batch_size: int = 4,
               seed: int = 0, progress=None) -> SearchResult:
        found = select_by_criterion(handle, windows, remove, name, batch_size)
        found.kl = cut_kl(handle, windows, found.segments, options, batch_size)  # as clp and exhaustive score it
        return found

    return search


METHODS: dict[str, Method] = {
    "clp": Method(search_gate, "the concave gate: a soft notch whose position is learned by minimising the KL "
                               "between the dense and the gated model"),
    "exhaustive": Method(search_exhaustive, "the exact oracle: the hard-cut KL of every window of n layers"),
    "repair": Method(repair.search_repair, "by what survives the repair: every contiguous cut and the gate's best "
                                           "cuts of two segments (--segments 1: contiguous only), each repaired "
                                           "briefly (--repair-proxy) and scored on held-out calibration windows; the "
                                           "best few of each number repaired longer and ranked by their KL "
                                           "extrapolated to the full heal"),
    **{name: Method(_criterion(name), criterion.help) for name, criterion in CRITERIA.items()},
}
GATE_METHODS = ("clp",)  # the methods that train the gate (and take the gate options)
SEGMENTED_METHODS = ("clp", "exhaustive", "repair")  # the methods that take --segments


def removal_count(options: SearchOptions, total: int) -> int:
    """Layers to remove from ``--remove`` or ``--ratio`` (rounded to whole layers)."""
    if options.remove is not None and options.ratio is not None:
        raise LayercutError("give either --remove N or --ratio R, not both")
    if options.remove is not None:
        count = options.remove
    elif options.ratio is not None:
        if not 0 < options.ratio < 1:
            raise LayercutError(f"--ratio {options.ratio} must be between 0 and 1 (a fraction of the layers)")
        count = round(options.ratio * total)
    else:
        raise LayercutError("say how much to remove: --remove N, --ratio R or --segment START:END")
    if not 0 < count < total:
        raise LayercutError(f"cannot remove {count} of {total} layers; choose between 1 and {total - 1}")
    if count < options.segments:
        raise LayercutError(f"cannot split {count} removed layers into {options.segments} segments")
    return count


def plan(options: SearchOptions, total: int) -> list[Segment] | int:
    """The validated segments the options name, or else the number of layers to remove; checked before work."""
    if options.segment:
        return validate_segments([parse_segment(text) for text in options.segment], total)
    if options.segments > 1 and options.method not in SEGMENTED_METHODS:
        raise LayercutError(f"--segments applies to {', '.join(SEGMENTED_METHODS)}; {options.method} chooses its own "
                            "layers")
    return removal_count(options, total)


def search_steps(options: SearchOptions) -> int | None:
    """Units of progress the search reports, for a progress bar: the gate's steps (clp); the repair method's cheap
    repairs with one segment, at most (its candidates and the tail cut, and its finalists when there are several);
    None where no count is known before the search."""
    if options.segment:
        return None
    if options.method in GATE_METHODS:
        return gate_settings(options).gate_steps
    if options.method == "repair" and options.segments == 1 and options.repair_candidates is not None:
        longer = options.repair_finalists if options.repair_proxy == "endpoints" and options.repair_finalists > 1 else 0
        return options.repair_candidates + 1 + longer
    return None


def search(handle: Handle, windows: torch.Tensor, options: SearchOptions, batch_size: int = 4, seed: int = 0,
           progress=None, scorer=None) -> SearchResult:
    """The segments to cut: the given ones, or those the options' method finds on calibration ``windows``
    ``[N, T]``. ``progress`` (optional) is called with 1 after each gate step or short heal (:func:`search_steps`).
    ``scorer``: an exact scorer (:func:`layercut.gate.exact_scorer`) of the same windows to share between searches,
    for the methods that score cuts exactly (:data:`SEGMENTED_METHODS`)."""
    planned = plan(options, handle.num_layers)
    types = layer_pattern(handle) if options.keep_period else None
    if isinstance(planned, list):
        if types and not keeps_layer_pattern(types, planned):
            raise LayercutError(f"--segment {' '.join(options.segment)} moves the model's full-attention layers "
                                "(config.layer_types), which --keep-period forbids; give a segment whose length is a "
                                "multiple of the pattern's period, or drop --keep-period")
        return SearchResult("given", planned, float("nan"), 0.0)
    if types:
        return search_keeping_pattern(handle, windows, planned, types, options, batch_size)
    if scorer is not None and options.method in SEGMENTED_METHODS:
        return METHODS[options.method].search(handle, windows, planned, options, batch_size, seed, progress,
                                              scorer=scorer)
    return METHODS[options.method].search(handle, windows, planned, options, batch_size, seed, progress)


def layer_pattern(handle: Handle) -> list[str] | None:
    """The model's per-layer attention types when they differ between layers (else None: nothing to keep)."""
    types = list(getattr(text_config(handle.model), "layer_types", None) or [])
    return types if len(set(types)) > 1 else None


def search_keeping_pattern(handle: Handle, windows: torch.Tensor, remove: int, types: list[str],
                           options: SearchOptions, batch_size: int = 4) -> SearchResult:
    """The cut of ``remove`` layers with the lowest exact hard-cut KL among those that keep the per-layer
    ``types`` (:func:`~layercut.layers.keeps_layer_pattern`); they are few, so every one is scored."""
    started = time.perf_counter()
    candidates = [c for c in cuts(len(types), remove, options.segments) if keeps_layer_pattern(types, c)]
    if not candidates:
        total = len(types)
        counts = [n for n in range(1, total) if any(keeps_layer_pattern(types, c) for c in cuts(total, n, 1))]
        raise LayercutError(f"no cut of {remove} layers in {options.segments} segment(s) keeps the model's attention "
                            f"pattern (config.layer_types), as --keep-period asks; removals that keep it: "
                            f"{', '.join(map(str, counts)) or 'none'} layers")
    losses = checked(exact_scorer(handle, windows, options, batch_size))(candidates)
    best = min(range(len(candidates)), key=losses.__getitem__)
    return SearchResult("keep-period", list(candidates[best]), losses[best], time.perf_counter() - started,
                        len(candidates), [], {candidate_key(c): v for c, v in zip(candidates, losses)})

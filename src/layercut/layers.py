"""A decoder-only model is a list of decoder layers: find that list, and cut segments out of it in place."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from layercut.errors import LayercutError
from layercut.report import segments_text

logger = logging.getLogger(__name__)

Segment = tuple[int, int]
Candidate = tuple[Segment, ...]  # a cut: sorted, non-overlapping segments

# Config entries that hold one value per decoder layer and are sliced with the layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")
# Config entries that are lists but never per-layer, whatever their length.
NOT_PER_LAYER_CONFIG_KEYS = ("architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens")


def text_config(model: nn.Module):
    """The config that owns ``num_hidden_layers`` (the text config of a multimodal model)."""
    return text_part(model.config)


def text_part(config):
    """``config``'s text config (a multimodal model's), or ``config`` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers the model's config declares."""
    return int(text_config(model).num_hidden_layers)


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted name, module list)`` of the model's decoder layers.

    The layers are the one ``nn.ModuleList`` of length ``num_hidden_layers`` whose elements are all of a class
    named in ``model._no_split_modules`` (``model.layers`` for Llama-like models, ``transformer.h`` for GPT-2,
    ``model.decoder.layers`` for OPT). ``layers_path`` names the list explicitly when that rule finds none or
    several.
    """
    if layers_path:
        try:
            module = model.get_submodule(layers_path)
        except AttributeError as error:
            raise LayercutError(f"layers_path {layers_path!r} names no submodule of the model ({error})") from error
        if not isinstance(module, nn.ModuleList):
            raise LayercutError(f"layers_path {layers_path!r} is a {type(module).__name__}, not an nn.ModuleList")
        return layers_path, module
    expected = num_layers(model)
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == expected
        and all(type(layer).__name__ in block_classes for layer in module)
    ]
    if len(found) == 1:
        return found[0]
    names = ", ".join(name for name, _ in found) or "none"
    raise LayercutError(
        f"cannot tell which module list holds the {expected} decoder layers of {type(model).__name__} "
        f"(candidates: {names}); pass layers_path='dotted.name' (CLI: --layers-path) to name it"
    )


@dataclass
class Handle:
    """A loaded causal LM with its decoder layers, found once, and its tokenizer: what every stage takes.

    Cutting deletes from ``layers`` in place, so the handle stays valid after a cut.
    """

    model: nn.Module
    layers: nn.ModuleList
    layers_name: str
    tokenizer: Any = None

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any = None, layers_path: str | None = None) -> Handle:
        """Wrap ``model``, finding its decoder layers (see :func:`find_decoder_layers`)."""
        name, layers = find_decoder_layers(model, layers_path)
        return cls(model, layers, name, tokenizer)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True)
class Cut:
    """What the cut stage did: the removed segments (original indices) and the sizes before and after."""

    segments: list[Segment]
    layers_before: int
    layers_after: int
    parameters_before: int
    parameters_after: int


def cut(handle: Handle, segments: Sequence[Sequence[int]]) -> Cut:
    """Remove ``segments`` (0-based, half-open, original indices) from the handle's model in place."""
    layers_before, parameters_before = handle.num_layers, handle.parameter_count()
    removed = drop_layers(handle.model, segments, layers=handle.layers)
    return Cut(removed, layers_before, handle.num_layers, parameters_before, handle.parameter_count())


def validate_segments(segments: Sequence[Sequence[int]], total: int) -> list[Segment]:
    """Check 0-based half-open segments against ``total`` layers; return them sorted as tuples.

    Raises LayercutError for an empty, reversed, out-of-range or overlapping segment, or for a cut that would
    leave no layer.
    """
    if not segments:
        raise LayercutError("no segment to remove; give at least one START:END (0-based, END exclusive)")
    checked = []
    for segment in segments:
        if len(segment) != 2:
            raise LayercutError(f"segment {segment!r} must be a pair START:END")
        start, end = int(segment[0]), int(segment[1])
        if start >= end:
            raise LayercutError(
                f"segment {start}:{end} is empty; END is exclusive, so {start}:{start + 1} removes layer {start}"
            )
        if start < 0 or end > total:
            raise LayercutError(
                f"segment {start}:{end} is out of range for a model with {total} layers (valid: 0 <= START < END <= {total})"
            )
        checked.append((start, end))
    checked.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(checked):
        if s1 < e0:
            raise LayercutError(f"segments {s0}:{e0} and {s1}:{e1} overlap; merge them into {s0}:{max(e0, e1)}")
    removed = sum(end - start for start, end in checked)
    if removed >= total:
        raise LayercutError(f"removing {removed} of {total} layers leaves none; remove at most {total - 1}")
    return checked


def kept_layers(segments: Sequence[Segment], total: int) -> list[int]:
    """Original indices of the layers that survive cutting ``segments`` out of ``total`` layers."""
    removed = {index for start, end in segments for index in range(start, end)}
    return [index for index in range(total) if index not in removed]


def keeps_layer_pattern(types: Sequence[str], segments: Sequence[Segment]) -> bool:
    """Whether the layers kept after cutting ``segments`` have the original's first per-layer ``types``
    (``config.layer_types``): then a loader that derives each layer's type from its position, such as llama.cpp's
    fixed period of sliding and full attention, runs the cut model as transformers does."""
    kept = kept_layers(segments, len(types))
    return [types[index] for index in kept] == list(types[: len(kept)])


def merge_adjacent(segments: Sequence[Segment]) -> list[Segment]:
    """Sorted segments with touching ones joined (``[(2, 4), (4, 6)] -> [(2, 6)]``)."""
    merged: list[list[int]] = []
    for start, end in sorted(segments):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def per_layer_config_keys(config, total: int) -> list[str]:
    """Names of the config's per-layer lists; raises LayercutError for a list of length ``total`` we do not know."""
    keys = []
    for key, value in config.to_dict().items():
        if not isinstance(value, (list, tuple)) or key in NOT_PER_LAYER_CONFIG_KEYS:
            continue
        if key in PER_LAYER_CONFIG_KEYS:
            if len(value) != total:
                raise LayercutError(f"config.{key} has {len(value)} entries but the model has {total} layers")
            keys.append(key)
        elif len(value) == total:
            raise LayercutError(
                f"config.{key} is a list with one entry per layer that layercut does not know how to slice; "
                f"open an issue, or remove the entry from config.json if it is unused"
            )
    return keys


def drop_layers(model: nn.Module, segments: Sequence[Sequence[int]], layers_path: str | None = None,
                layers: nn.ModuleList | None = None) -> list[Segment]:
    """Remove the decoder layers in ``segments`` (0-based, half-open, original indices) from ``model`` in place.

    Afterwards every submodule's ``layer_idx`` equals its new position, per-layer config lists are sliced and
    ``num_hidden_layers`` is the new count, so ``save_pretrained`` writes a standard checkpoint. ``layers`` is
    the decoder layer list when already known (else found by ``layers_path`` or structure). Returns the
    validated, sorted segments.
    """
    if layers is None:
        _, layers = find_decoder_layers(model, layers_path)
    config = text_config(model)
    total = len(layers)
    checked = validate_segments(segments, total)
    keys = per_layer_config_keys(config, total)
    keep = kept_layers(checked, total)
    for index in sorted({i for start, end in checked for i in range(start, end)}, reverse=True):
        del layers[index]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    for key in keys:
        values = list(getattr(config, key))
        setattr(config, key, [values[index] for index in keep])
    config.num_hidden_layers = len(keep)
    keep_derived_settings(config, keep)
    if config is not model.config and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = len(keep)
    logger.info("removed layers %s: %d -> %d decoder layers", segments_text(checked), total, len(keep))
    return checked


PERIOD_KEYS = ("sliding_window_pattern", "_sliding_window_pattern")  # one full-attention layer every N


def keep_derived_settings(config, keep: Sequence[int]) -> None:
    """After a cut that kept the original layers ``keep``: ``max_window_layers`` (the layers below it use full
    attention) counts the kept layers below it, and a period of full attention that no longer matches
    ``layer_types`` is removed (``layer_types`` says it all; a stale period would mislead loaders that read it)."""
    limit = getattr(config, "max_window_layers", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        config.max_window_layers = sum(1 for index in keep if index < limit)
    types = getattr(config, "layer_types", None)
    for key in PERIOD_KEYS:
        period = getattr(config, key, None)
        if types and isinstance(period, int) and not matches_period(types, period):
            delattr(config, key)
            logger.warning("removed config.%s = %d: the cut layers' attention types no longer repeat with that period "
                           "(config.layer_types lists them)", key, period)


def matches_period(types: Sequence[str], period: int) -> bool:
    """Whether ``types`` has full attention exactly at every ``period``-th layer (1-based), as a period implies."""
    return period > 0 and all((kind == "full_attention") == ((index + 1) % period == 0)
                              for index, kind in enumerate(types))


def serving_config_problems(config: dict) -> list[str]:
    """What in a saved ``config.json`` (as a dict) a serving engine such as vLLM, which reads the file rather than
    transformers' objects, would read wrongly after a cut: custom code, per-layer lists of another length than
    ``num_hidden_layers``, a stale period of full attention, an inconsistent ``max_window_layers``."""
    config = config.get("text_config") or config
    total, types, problems = config.get("num_hidden_layers"), config.get("layer_types"), []
    if config.get("auto_map"):
        problems.append("auto_map: the model needs custom code (trust_remote_code)")
    for key in PER_LAYER_CONFIG_KEYS:
        if config.get(key) is not None and len(config[key]) != total:
            problems.append(f"{key} has {len(config[key])} entries for {total} layers")
    for key in PERIOD_KEYS:
        if types and isinstance(config.get(key), int) and not matches_period(types, config[key]):
            problems.append(f"{key} = {config[key]} does not match layer_types")
    limit = config.get("max_window_layers")
    if isinstance(limit, int) and total is not None and limit > total:
        problems.append(f"max_window_layers = {limit} is more than the {total} layers")
    if isinstance(limit, int) and types and config.get("use_sliding_window") and \
            [kind == "sliding_attention" for kind in types] != [index >= limit for index in range(len(types))]:
        problems.append(f"max_window_layers = {limit} does not match layer_types")
    return problems


def parse_segment(text: str) -> Segment:
    """Parse ``"START:END"`` (0-based, END exclusive) into a pair; LayercutError on anything else."""
    parts = text.split(":")
    try:
        start, end = (int(part) for part in parts)
    except ValueError:
        raise LayercutError(f"segment {text!r} must look like START:END with integers, e.g. 12:18") from None
    return start, end

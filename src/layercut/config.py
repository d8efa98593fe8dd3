"""Typed, frozen, validated options for every stage.

The YAML recipe and the CLI flags are generated from these classes, and their one validation (types, ranges,
finiteness, conflicting options, devices) serves the recipe file, the flags and the Python API alike. pydantic does
the checking; an error names the flag and the recipe key and exits the CLI with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layercut import data, gguf, heal, quantize, selection, zeroshot
from layercut.errors import LayercutError
from layercut.layers import parse_segment
from layercut.load import parse_max_memory

# The choices come from the registries, where each name has its function and help.
METHODS = tuple(selection.METHODS)
HEALS = tuple(heal.HEALS)
HEAL_INITS = ("none", *heal.PATCHES)
REPAIR_PROXIES = ("endpoints", *heal.PATCHES)
QUANT_SCHEMES = tuple(quantize.SCHEMES)
GGUF_TYPES = tuple(gguf.GGUF_TYPES)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# --method repair's calibration windows when none are given: on 32, its 50-step proxy left Gemma-3 n = 6's two best
# cuts 0.12 % apart; on 128, 3.2 % apart in the full heal's order (bench/results/repair-pick-cpu)
REPAIR_CALIB_WINDOWS = 128
HEAL_STEPS = 200  # the heal's default steps, and the horizon --method repair extrapolates its finalists to
# --method repair's defaults with one segment: the contiguous cuts ranked on --gate-screen's windows, the 4 lowest
# and the tail screened by a short heal, the lowest after it kept without a longer heal. Never worse than clp beyond
# the paired interval in any cell and seed of bench/results/grid-repair1-h100, at 0.36x the heal's time at the 8B
# shape (bench/results/repair-cost-rank4-h100; 0.75x lean, below). With several segments: every contiguous cut and
# the 4 lowest of each larger number screened, 3 finalists of each number healed longer (13.4x the heal,
# repair-cost-seg2-h100).
REPAIR_CANDIDATES = 4
REPAIR_FINALISTS = {"one segment": 1, "several": 3}
# --method repair's memory defaults with one segment: lean short heals (--gate-checkpointing) and a 2 GiB exact cache.
# At the 8B shape its search then peaks at 1.19x the weights against 1.47x and adds 0.75x the heal's time against
# 0.35x, with the same cut and KLs (bench/results/repair-cost-fixed-h100); the other searches keep 4 GiB and no
# checkpointing unless told.
EXACT_CACHE_GIB = {"lean": 2.0, "other": 4.0}


def option(default: Any, help: str, aliases: tuple[str, ...] = (), **constraints: Any) -> Any:
    """A field whose ``help`` is the one description used by the CLI, the YAML recipe and the model card;
    ``aliases`` are older flag names that still work; ``constraints`` are pydantic's (``ge``, ``gt``, ...)."""
    return Field(default, description=help, json_schema_extra={"aliases": list(aliases)}, **constraints)


class Options(BaseModel):
    """Base of every option section: frozen, strict about types (no 2.9 for an integer, no ``true`` for a
    number), finite numbers only, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False,
                              validate_default=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise LayercutError(describe(error, type(self))) from None

    def replace(self, **changes: Any):
        """A validated copy with ``changes``."""
        return type(self)(**{**self.model_dump(exclude_unset=True), **changes})

    def defaulted(self, name: str, value: Any):
        """These options with ``name`` at ``value`` unless it was given, and still counted as not given: a default
        that depends on another section. A copy, so that options shared with another recipe keep theirs."""
        if name in self.model_fields_set or getattr(self, name) == value:
            return self
        copy = self.model_copy(update={name: value})
        copy.model_fields_set.discard(name)
        return copy


class ModelOptions(Options):
    """How to load the model."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weight dtype; auto = bfloat16 on GPU, float32 on CPU")
    device: str = option("auto", "device for the model (cpu, cuda, cuda:1, mps); auto = cuda when available")
    device_map: str | None = option(
        None, "accelerate device map to spread a large model over devices: auto, balanced, balanced_low_0, "
        "sequential, or one device")
    max_memory: str | None = option(
        None, "memory each device may take under --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    offload_folder: str | None = option(None, "folder for the weights --device-map offloads to disk")
    trust_remote_code: bool = option(False, "allow model code from the hub repository to run (off by default)")
    layers_path: str | None = option(None, "dotted name of the decoder layer list when it cannot be found",
                                     min_length=1)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        return check_device(device)

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, device_map: str | None) -> str | None:
        if device_map is not None and device_map not in DEVICE_MAPS:
            check_device(device_map)
        return device_map

    @field_validator("max_memory")
    @classmethod
    def _parsable_max_memory(cls, max_memory: str | None) -> str | None:
        if max_memory is not None:
            parse_max_memory(max_memory)
        return max_memory

    @model_validator(mode="after")
    def _placement(self):
        if (self.max_memory or self.offload_folder) and not self.device_map:
            raise ValueError("--max-memory and --offload-folder place a model through accelerate: add "
                             "--device-map auto")
        if self.device_map and self.device != "auto":
            raise ValueError(f"--device {self.device} and --device-map {self.device_map} both place the model; "
                             "give one of them")
        return self


class DataOptions(Options):
    """Calibration and perplexity text."""

    calib: str = option("wiki", "calibration text: wiki, lee, a .txt/.jsonl path, or wikitext2/c4/alpaca (online)")
    calib_windows: int = option(32, f"number of calibration windows: {REPAIR_CALIB_WINDOWS} unless given with "
                                "--method repair (the default method), this default with the others", ge=1)
    seq_len: int = option(256, "tokens per calibration and perplexity window", ge=2)
    seed: int = option(0, "seed for calibration sampling and training", ge=0)
    ppl: str = option("wiki", "perplexity text (its test part): same choices as --calib")
    ppl_windows: int = option(64, "number of perplexity windows (0 = the whole test text)", ge=0)
    batch_size: int = option(4, "windows per forward pass during search and evaluation", ge=1)

    @field_validator("calib", "ppl")
    @classmethod
    def _known_source(cls, source: str) -> str:
        try:
            data.check_source(source)
        except LayercutError as error:
            raise ValueError(str(error)) from None
        return source


class SearchOptions(Options):
    """Which layers to remove."""

    segment: tuple[str, ...] = option((), "remove this segment START:END (0-based, END exclusive); repeatable")
    remove: int | None = option(None, "number of layers to remove", ge=1)
    ratio: float | None = option(None, "fraction of layers to remove (rounded to whole layers)", gt=0, lt=1)
    method: Literal[METHODS] = option("repair", "how to choose the layers to remove")  # type: ignore[valid-type]
    segments: int = option(1, "at most this many separate contiguous segments (clp, exhaustive, repair)", ge=1)
    gate_steps: int | None = option(None, "optimisation steps of the concave gate (clp); default 5 for one segment, "
                                    "60 for several", ge=1)
    gate_lr: float | None = option(None, "learning rate of the gate position (clp); default 0.4 for one segment, 0.2 "
                                   "for several", gt=0)
    gate_profiles: int = option(0, "gate profiles trained side by side, each started at another depth (clp); "
                                "0 = enough that their starts are about half the removed width apart",
                                aliases=("--gate-starts",), ge=0)
    gate_windows: int | None = option(None, "calibration windows per gate step (clp); default 2 for one segment, 4 "
                                      "for several", ge=1)
    gate_checkpointing: bool | None = option(
        None, "recompute each decoder layer during backward in the search instead of storing its activations: the "
        "gate's steps (clp) and the repair method's short heals, whose output head and KL then also run over chunks "
        "of positions and whose trained layers' copies stay in host memory (less memory, more compute); default on "
        "with --method repair and one segment, off otherwise")
    tau_start: float = option(1.0, "initial gate temperature in layers (clp)", gt=0)
    tau_end: float | None = option(None, "gate temperature in layers at the last step (clp); default 0.4 for one "
                                   "segment, 0.05 for several", gt=0)
    gate_context: int | None = option(None, "tokens of each window a gate step runs, its first ones (clp); 0 = the "
                                      "whole window; default 128 for one segment, 0 for several", ge=0)
    gate_positions: int | None = option(None, "positions per window in each gate step's KL, drawn at random among "
                                        "those run (clp); 0 = all; default 64 for one segment, 0 for several", ge=0)
    gate_patience: int = option(0, "stop the gate once every profile's rounding has stayed the same for this many "
                                "steps (clp); 0 = run all steps", ge=0)
    gate_screen: int | None = option(None, "calibration windows on which cuts are screened before the best are scored "
                                     "on all: the gate's read-out cuts, the best three (clp), and with one segment "
                                     "and --repair-candidates every contiguous cut, the best K (repair); 0 = score "
                                     "every such cut on all; default 4 for one segment, 0 for several", ge=0)
    exact_cache_gib: float | None = option(
        None, "memory the exact scoring may keep (GiB): the dense model's hidden states between layers and its output "
        f"log-probabilities, computed once for every cut scored; default {EXACT_CACHE_GIB['lean']:g} with --method "
        f"repair and one segment, {EXACT_CACHE_GIB['other']:g} otherwise", ge=0)
    repair_candidates: int | None = option(
        None, "cuts of each number of segments the repair method screens, those of lowest KL (on --gate-screen's "
        f"windows with one segment), plus the tail cut; default {REPAIR_CANDIDATES} with one segment; with several, "
        f"every contiguous cut and the {REPAIR_CANDIDATES} lowest of each larger number", ge=1)
    repair_proxy: Literal[REPAIR_PROXIES] = option(  # type: ignore[valid-type]
        "endpoints", "the repair method's cheap repair of each candidate: a short endpoints heal "
        "(--repair-screen-steps, then --repair-steps for the finalists), or a training-free linear patch")
    repair_screen_steps: int = option(10, "steps of the short endpoints heal that screens every candidate (repair)",
                                      ge=1)
    repair_finalists: int | None = option(
        None, "candidates of each number of segments, those of lowest KL after the screen, that are healed again for "
        "--repair-steps steps (repair); a lone finalist wins without that heal; default "
        f"{REPAIR_FINALISTS['one segment']} with one segment, {REPAIR_FINALISTS['several']} with several", ge=1)
    repair_steps: int = option(50, "steps of the finalists' short endpoints heal (repair)", ge=1)
    repair_horizon: int = option(
        HEAL_STEPS, "heal steps to which each finalist's held-out KL is extrapolated, on the power law through its "
        "KL after --repair-screen-steps and after --repair-steps, before the lowest wins (repair); follows "
        "--heal-steps unless given", ge=1)
    keep_period: bool = option(
        False, "only cuts after which the kept layers' attention types (config.layer_types) are the original's first "
        "ones, so that loaders deriving them from a fixed period (llama.cpp) run the cut model right; the cut is "
        "chosen among those by the exact hard-cut KL, whatever --method")
    exhaustive_budget: float = option(3600.0, "seconds the exhaustive oracle may take; a larger search (estimated "
                                      "before it starts) is refused", gt=0)

    @field_validator("segment", mode="before")
    @classmethod
    def _segment_texts(cls, value: Any) -> Any:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple) and any(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise ValueError("a segment is START:END text; quote it in a YAML recipe ('2:4'): unquoted, YAML reads "
                             "2:4 as the base-60 number 124")
        return value

    @field_validator("segment")
    @classmethod
    def _parsable_segments(cls, segments: tuple[str, ...]) -> tuple[str, ...]:
        for text in segments:
            start, end = parse_segment(text)
            if not 0 <= start < end:
                raise ValueError(f"segment {text} must have 0 <= START < END (END is exclusive: {start}:{start + 1} "
                                 f"removes layer {start})")
        return segments

    @model_validator(mode="after")
    def _repair_defaults_by_segments(self):
        """``--method repair``'s candidates and finalists when not given, by the number of segments: with one,
        :data:`REPAIR_CANDIDATES` cuts and one finalist; with several, every contiguous cut and
        :data:`REPAIR_CANDIDATES` of each larger number, and three finalists (:data:`REPAIR_FINALISTS`). With one
        segment the repair method's search is also lean unless told (checkpointed short heals, the smaller exact
        cache of :data:`EXACT_CACHE_GIB`). They stay defaults: a copy with another method or number of segments
        gets that one's."""
        one = self.segments == 1
        lean = one and self.method == "repair"
        wanted = {"repair_candidates": REPAIR_CANDIDATES if one else None,
                  "repair_finalists": REPAIR_FINALISTS["one segment" if one else "several"],
                  "gate_checkpointing": lean, "exact_cache_gib": EXACT_CACHE_GIB["lean" if lean else "other"]}
        for name, value in wanted.items():
            # left out, or null (in a YAML recipe): this method's and number's default; a null number of candidates
            # is a value of its own (every cut)
            unset = name not in self.model_fields_set or (getattr(self, name) is None and name != "repair_candidates")
            if unset and getattr(self, name) != value:
                object.__setattr__(self, name, value)  # the options are frozen; this is their own validation
        return self

    @model_validator(mode="after")
    def _one_way_to_say_what_to_remove(self):
        if self.segment and (self.remove is not None or self.ratio is not None):
            raise ValueError("--segment names the layers to remove; give it without --remove or --ratio")
        if self.segment and self.segments != 1:
            raise ValueError("--segments splits a searched removal; with --segment the segments are given")
        if self.remove is not None and self.ratio is not None:
            raise ValueError("give either --remove N or --ratio R, not both")
        if self.remove is not None and self.segments > self.remove:
            raise ValueError(f"cannot split {self.remove} removed layers into {self.segments} segments")
        return self


class HealOptions(Options):
    """How to heal the cut."""

    heal: Literal[HEALS] = option("endpoints", "what to train after the cut")  # type: ignore[valid-type]
    heal_steps: int = option(HEAL_STEPS, "optimizer steps of the heal", ge=1)
    heal_lr: float | None = option(
        None, "learning rate of the heal (AdamW); default by heal: endpoints 1e-3, last-k 1e-4, lora 2e-4", gt=0)
    heal_batch: int = option(8, "windows per heal step", ge=1)
    heal_windows: int = option(256, "training windows drawn from the calibration text for the heal", ge=1)
    heal_loss: Literal["kl", "lm"] = option("kl", "kl: match the dense model's next-token distribution; lm: plain "
                                                  "LM loss")
    heal_top_k: int = option(64, "teacher log-probabilities kept per token for the kl loss", ge=1)
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of full weights (0 = full weights)", ge=0)
    last_k: int = option(2, "layers trained by the last-k heal", ge=1)
    endpoint_layers: int = option(1, "layers trained on each side of each cut by the endpoints heal", ge=1)
    heal_init: Literal[HEAL_INITS] = option(  # type: ignore[valid-type]
        "none", "a training-free linear patch folded in right after the cut, from which a training heal (endpoints, "
        "last-k, all, lora) starts; fitted on the heal's own windows")

    @model_validator(mode="after")
    def _init_needs_a_training_heal(self):
        spec = heal.HEALS[self.heal]
        if self.heal_init != "none" and (self.heal == "none" or spec.apply is not None):
            raise ValueError(f"--heal-init {self.heal_init} starts a training heal from a patch; --heal {self.heal} "
                             "trains nothing of that kind: use --heal endpoints, last-k, all or lora, or --heal "
                             f"{self.heal_init} for the patch alone")
        return self


class EvalOptions(Options):
    """What to measure besides perplexity."""

    eval: bool = option(False, "prune: evaluate zero-shot tasks and speed before and after the cut")
    tasks: str = option("", "comma-separated lm-eval tasks (prune --eval without tasks: the seven standard ones)")
    limit: int | None = option(None, "items per zero-shot task (default: all)", ge=1)
    speed: bool = option(False, "measure prefill and decode tokens per second")
    agreement: bool = option(
        False, "measure the pruned model's agreement with the dense model: per-token KL(dense || pruned) and top-1 "
        "agreement on the test windows of --agreement-texts, and greedy generation from held-out prompts")
    agreement_texts: str = option("wiki,lee", "comma-separated texts whose test windows (--seq-len tokens, "
                                  "--ppl-windows windows) measure the agreement; same choices as --ppl", min_length=1)
    generation_prompts: int = option(200, "held-out prompts cut from the --ppl test text for the generation "
                                     "agreement (0 = no generation)", ge=0)
    prompt_tokens: int = option(32, "tokens per generation prompt", ge=2)
    new_tokens: int = option(64, "tokens each model generates greedily per prompt", ge=1)
    match_tokens: int = option(16, "the generation agreement counts the prompts whose first this many generated "
                               "tokens match the dense model's", ge=1)
    generation_batch: int = option(32, "prompts generated side by side", ge=1)

    @field_validator("agreement_texts")
    @classmethod
    def _known_texts(cls, texts: str) -> str:
        names = [text.strip() for text in texts.split(",")]
        if not all(names):
            raise ValueError(f"{texts!r} is not a comma-separated list of texts")
        for name in names:
            try:
                data.check_source(name)
            except LayercutError as error:
                raise ValueError(str(error)) from None
        return texts

    @model_validator(mode="after")
    def _match_within_generation(self):
        if self.match_tokens > self.new_tokens:
            raise ValueError(f"--match-tokens {self.match_tokens} is more than the --new-tokens {self.new_tokens} "
                             "generated; lower --match-tokens or raise --new-tokens")
        return self

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: str) -> str:
        names = [task.strip() for task in tasks.split(",")]
        if tasks.strip() and (not all(names) or any(name not in zeroshot.CHANCE for name in names)):
            raise ValueError(f"{tasks!r} is not a comma-separated list of tasks; choose from "
                             f"{', '.join(zeroshot.CHANCE)}")
        return tasks


class QuantizeOptions(Options):
    """Whether to quantize the pruned model."""

    quantize: Literal[QUANT_SCHEMES] | None = option(  # type: ignore[valid-type]
        None, "quantize with this scheme: int8 / int4 (round-to-nearest) or gptq-w4a16 (GPTQ on the calibration "
        "windows), saved as compressed-tensors; bnb-int8 / bnb-nf4 (bitsandbytes); none = full precision",
        aliases=("--scheme",))
    group_size: int = option(0, "inputs per weight scale (int8, int4, gptq-w4a16); 0 = the largest of 128, 64, 32 "
                             "that divides every layer's input width", ge=0)

    @model_validator(mode="after")
    def _group_size_applies(self):
        if self.group_size and self.quantize and not quantize.SCHEMES[self.quantize].grouped:
            grouped = ", ".join(name for name, scheme in quantize.SCHEMES.items() if scheme.grouped)
            raise ValueError(f"--group-size applies to {grouped}, not to {self.quantize}")
        return self


class ExportOptions(Options):
    """Which files the export writes besides the transformers checkpoint."""

    format: Literal["safetensors", "gguf"] = option(
        "safetensors", "safetensors: the transformers checkpoint; gguf: also a GGUF for llama.cpp and Ollama, made by "
        "llama.cpp's own converter and quantizer and checked against transformers (pip install 'layercut[gguf]')")
    gguf_type: tuple[Literal[GGUF_TYPES], ...] = option(  # type: ignore[valid-type]
        ("f16",), "GGUF weight type, repeatable: f16, q8_0 or q4_k_m; each file is checked against transformers")
    gguf_windows: int = option(8, "held-out perplexity windows on which each GGUF is compared with transformers", ge=1)
    gguf_layer_pattern: Literal["check", "write", "ignore"] = option(
        "check", "when llama.cpp would give a layer another attention (sliding or full) than config.layer_types: "
        "check = refuse the export, write = store one sliding-window flag per layer in the GGUF, ignore = export "
        "anyway and record it")

    @field_validator("gguf_type", mode="before")
    @classmethod
    def _type_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value

    @field_validator("gguf_type")
    @classmethod
    def _some_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"name at least one GGUF type: {', '.join(GGUF_TYPES)}")
        return tuple(dict.fromkeys(value))


class Recipe(BaseModel):
    """Everything a prune run needs, except the model name and the output folder."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: ModelOptions = Field(default_factory=ModelOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    search: SearchOptions = Field(default_factory=SearchOptions)
    heal: HealOptions = Field(default_factory=HealOptions)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    quantization: QuantizeOptions = Field(default_factory=QuantizeOptions)
    export: ExportOptions = Field(default_factory=ExportOptions)

    @model_validator(mode="after")
    def _repair_defaults(self):
        """Defaults that depend on another section, kept defaults (a copy with another method or heal gets that
        one's): ``--method repair`` draws :data:`REPAIR_CALIB_WINDOWS` calibration windows, since its short heals
        train on half of them and are scored on the other half; and it extrapolates its finalists to the heal's
        steps (``repair_horizon``)."""
        windows = (REPAIR_CALIB_WINDOWS if self.search.method == "repair"
                   else DataOptions.model_fields["calib_windows"].default)
        # the recipe is frozen; this is its own validation
        object.__setattr__(self, "data", self.data.defaulted("calib_windows", windows))
        object.__setattr__(self, "search", self.search.defaulted("repair_horizon", self.heal.heal_steps))
        return self

    def replace(self, **sections: Options) -> Recipe:
        """A copy with whole sections replaced."""
        return Recipe(**{**{name: getattr(self, name) for name in SECTIONS}, **sections})


SECTIONS = tuple(Recipe.model_fields)
SECTION_CLASSES: dict[str, type[Options]] = {name: field.annotation for name, field in Recipe.model_fields.items()}


# ----------------------------------------------------------------------------------------------- checks


def check_device(device: str) -> str:
    """``device`` when it names a device this machine has (``auto`` always does); else a LayercutError."""
    match = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", device)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ValueError(f"{device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if match[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match[2] or 0)
        if index >= count:
            raise ValueError(f"{device} is not available: this machine has {count} CUDA device(s); use --device cpu"
                             + (f" or cuda:0 to cuda:{count - 1}" if count else ""))
    if match[1] == "mps" and not torch.backends.mps.is_available():
        raise ValueError("mps is not available on this machine; use --device cpu")
    return device


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(error: ValidationError, cls: type[BaseModel]) -> str:
    """One line per problem, naming the flag and the recipe key: what pydantic found, in layercut's words."""
    section = next((name for name, each in SECTION_CLASSES.items() if each is cls), None)
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        message = message.replace("Input should be", "must be")
        if not item["loc"]:
            problems.append(message)
            continue
        name = str(item["loc"][0])
        key = f"{section}.{name}" if section else name
        if item["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            problems.append(f"unknown option {name!r} (recipe key {key}); valid options of {section or 'these'}: "
                            f"{valid}")
            continue
        got = item.get("input")
        shown = f"; got {got!r}" if got is not None and not isinstance(got, (dict, BaseModel)) else ""
        problems.append(f"{flag(name)} (recipe key {key}) {message}{shown}")
    return "; ".join(problems)


# ----------------------------------------------------------------------------------------------- recipes


def to_dict(recipe: Recipe) -> dict:
    """The recipe as nested plain data (tuples as lists), ready for YAML or JSON."""
    return recipe.model_dump(mode="json")


def from_dict(data: dict, base: Recipe | None = None) -> Recipe:
    """Build a Recipe from nested data over ``base`` (the values it was given); unknown sections or keys, wrong
    types, out-of-range values and conflicting options raise LayercutError."""
    base = base or Recipe()
    if not isinstance(data, dict):
        raise LayercutError(f"a recipe is a mapping of sections ({', '.join(SECTIONS)}), not {type(data).__name__}")
    unknown = [str(name) for name in data if name not in SECTION_CLASSES]
    if unknown:
        raise LayercutError(f"unknown recipe section(s) {sorted(unknown)}; valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTION_CLASSES.items():
        values = data.get(name)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise LayercutError(f"recipe section {name!r} must be a mapping of option: value, not {values!r}")
        renamed = {alias.lstrip("-").replace("-", "_"): key for key, field in cls.model_fields.items()
                   for alias in (field.json_schema_extra or {}).get("aliases", ())}
        values = {renamed.get(str(key), str(key)): value for key, value in values.items()}
        sections[name] = cls(**{**getattr(base, name).model_dump(exclude_unset=True), **values})
    return Recipe(**sections)


def load_recipe(path: str | Path, base: Recipe | None = None) -> Recipe:
    """Read a YAML recipe file over ``base``; LayercutError for a missing, non-UTF-8 or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise LayercutError(f"recipe file {path} does not exist (or is not a file)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LayercutError(f"recipe file {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it "
                            "as UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise LayercutError(f"recipe file {path} is not valid YAML{line}: {problem}") from None
    try:
        return from_dict(loaded or {}, base)
    except LayercutError as error:
        raise LayercutError(f"recipe file {path}: {error}") from None


# Options whose defaults follow other options (the validators of SearchOptions and Recipe): a recipe file states
# them only where they were given, so that a reused recipe with another method, number of segments or number of
# heal steps gets that one's defaults rather than this run's.
DEPENDENT_DEFAULTS = {"data": ("calib_windows",),
                      "search": ("gate_checkpointing", "exact_cache_gib", "repair_candidates", "repair_finalists",
                                 "repair_horizon")}


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text to reuse: every option, less the :data:`DEPENDENT_DEFAULTS` that were not given,
    whose values this run took are named in a comment instead (``layercut.json`` records every value)."""
    data, resolved = to_dict(recipe), []
    for section, names in DEPENDENT_DEFAULTS.items():
        given = getattr(recipe, section).model_fields_set
        resolved += [f"{section}.{name}: {json.dumps(data[section].pop(name))}" for name in names
                     if name not in given]
    text = yaml.safe_dump(data, sort_keys=False)
    if not resolved:
        return text
    note = ("Defaults that follow the method, the number of segments and the heal's steps, left out so that they "
            f"follow them again when this recipe is reused; this run's: {', '.join(resolved)}")
    return textwrap.fill(note, 100, initial_indent="# ", subsequent_indent="# ") + "\n" + text


# ----------------------------------------------------------------------------------------------- flags


def _base_type(hint):
    """``int | None -> int``; ``Literal[...]`` and ``tuple[...]`` stay as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = SECTIONS,
                  exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per option of the given recipe sections (less ``exclude``); defaults are left out of the
    namespace so that the flags actually given are known."""
    for name in sections:
        cls = SECTION_CLASSES[name]
        group = parser.add_argument_group(f"{name} options", cls.__doc__)
        for key, field in cls.model_fields.items():
            if key in exclude:
                continue
            flags = [flag(key), *(field.json_schema_extra or {}).get("aliases", ())]
            help_text = f"{field.description} (default: {field.default})"
            base = _base_type(field.annotation)
            common = {"dest": f"{name}.{key}", "default": argparse.SUPPRESS, "help": help_text}
            if base is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            elif typing.get_origin(base) is Literal:
                group.add_argument(*flags, choices=typing.get_args(base), **common)
            elif typing.get_origin(base) is tuple:
                group.add_argument(*flags, action="append", metavar=key.upper(), **common)
            else:
                group.add_argument(*flags, type=base, metavar=key.upper(), **common)


def recipe_from_arguments(arguments: argparse.Namespace, recipe_path: str | None = None) -> Recipe:
    """Defaults, then the YAML recipe (if any), then the flags given on the command line."""
    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    given: dict[str, dict] = {}
    for dest, value in vars(arguments).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            given.setdefault(section, {})[key] = tuple(value) if isinstance(value, list) else value
    return from_dict(given, recipe)

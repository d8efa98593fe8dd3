"""Typed, frozen options for every stage; the YAML recipe and the CLI flags are generated from these classes."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from layercut import heal, quantize, selection
from layercut.errors import LayercutError

# The choices come from the registries, where each name has its function and help.
METHODS = tuple(selection.METHODS)
HEALS = tuple(heal.HEALS)
QUANT_SCHEMES = tuple(quantize.SCHEMES)


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose ``help`` is the one description used by the CLI, the YAML docs and the card."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ModelOptions:
    """How to load the model."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weight dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    device: str = option("auto", "device for the model (cpu, cuda, cuda:1); auto = cuda when available")
    device_map: str | None = option(None, "accelerate device map (e.g. auto) to spread a large model over devices")
    max_memory: str | None = option(
        None, "memory each device may take under --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB"
    )
    offload_folder: str | None = option(None, "folder for the weights --device-map offloads to disk")
    trust_remote_code: bool = option(False, "allow model code from the hub repository to run (off by default)")
    layers_path: str | None = option(None, "dotted name of the decoder layer list when it cannot be found")


@dataclass(frozen=True)
class DataOptions:
    """Calibration and perplexity text."""

    calib: str = option("wiki", "calibration text: wiki, lee, a .txt/.jsonl path, or wikitext2/c4/alpaca (online)")
    calib_windows: int = option(32, "number of calibration windows")
    seq_len: int = option(256, "tokens per calibration and perplexity window")
    seed: int = option(0, "seed for calibration sampling and training")
    ppl: str = option("wiki", "perplexity text (its test part): same choices as --calib")
    ppl_windows: int = option(64, "number of perplexity windows (0 = the whole test text)")
    batch_size: int = option(4, "windows per forward pass during search and evaluation")


@dataclass(frozen=True)
class SearchOptions:
    """Which layers to remove."""

    segment: tuple[str, ...] = option((), "remove this segment START:END (0-based, END exclusive); repeatable")
    remove: int | None = option(None, "number of layers to remove")
    ratio: float | None = option(None, "fraction of layers to remove (rounded to whole layers)")
    method: Literal[METHODS] = option("clp", "how to choose the layers to remove")  # type: ignore[valid-type]
    segments: int = option(1, "number of separate contiguous segments to remove (clp)")
    gate_steps: int = option(60, "optimisation steps of the concave gate (clp)")
    gate_lr: float = option(0.2, "learning rate of the gate position (clp)")
    gate_profiles: int = option(0, "gate profiles trained side by side, each started at another depth (clp); "
                                "0 = enough that their starts are about half the removed width apart",
                                aliases=("--gate-starts",))
    gate_windows: int = option(4, "calibration windows per gate step (clp)")
    gate_checkpointing: bool = option(
        False, "recompute each decoder layer during the gate's backward pass instead of storing its activations "
        "(less memory, about a third more compute) (clp)"
    )
    tau_start: float = option(1.0, "initial gate temperature in layers (clp)")
    tau_end: float = option(0.05, "final gate temperature in layers (clp)")


@dataclass(frozen=True)
class HealOptions:
    """How to repair the cut."""

    heal: Literal[HEALS] = option("endpoints", "repair recipe after the cut")  # type: ignore[valid-type]
    heal_steps: int = option(200, "optimizer steps of the repair")
    heal_lr: float | None = option(
        None, "learning rate of the repair (AdamW); default by recipe: endpoints 1e-3, last-k 1e-4, lora 2e-4"
    )
    heal_batch: int = option(8, "windows per repair step")
    heal_windows: int = option(256, "training windows drawn from the calibration text for the repair")
    heal_loss: Literal["kl", "lm"] = option("kl", "kl: match the dense model's next-token distribution; lm: plain LM loss")
    heal_top_k: int = option(64, "teacher log-probabilities kept per token for the kl loss")
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of full weights (0 = full weights)")
    last_k: int = option(2, "layers trained by the last-k recipe")


@dataclass(frozen=True)
class EvalOptions:
    """What to measure besides perplexity."""

    eval: bool = option(False, "prune: evaluate zero-shot tasks and speed before and after the cut")
    tasks: str = option("", "comma-separated lm-eval tasks (prune --eval without tasks: the seven standard ones)")
    limit: int | None = option(None, "items per zero-shot task (default: all)")
    speed: bool = option(False, "measure prefill and decode tokens per second")


@dataclass(frozen=True)
class QuantizeOptions:
    """Whether to quantize the pruned model."""

    quantize: Literal[QUANT_SCHEMES] | None = option(  # type: ignore[valid-type]
        None, "quantize with this scheme: int8 / int4 (round-to-nearest) or gptq-w4a16 (GPTQ on the calibration "
        "windows), saved as compressed-tensors; bnb-int8 / bnb-nf4 (bitsandbytes); none = full precision",
        aliases=("--scheme",),
    )
    group_size: int = option(0, "inputs per weight scale (int8, int4, gptq-w4a16); 0 = the largest of 128, 64, 32 "
                             "that divides every layer's input width")


@dataclass(frozen=True)
class Recipe:
    """Everything a prune run needs, except the model name and the output folder."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    heal: HealOptions = field(default_factory=HealOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    quantization: QuantizeOptions = field(default_factory=QuantizeOptions)


SECTIONS = tuple(f.name for f in fields(Recipe))


def _section_classes() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Recipe)[f.name] for f in fields(Recipe)}


def to_dict(recipe: Recipe) -> dict:
    """The recipe as nested plain data (tuples as lists), ready for YAML or JSON."""

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return {
        name: {key: plain(value) for key, value in dataclasses.asdict(getattr(recipe, name)).items()}
        for name in SECTIONS
    }


def from_dict(data: dict, base: Recipe | None = None) -> Recipe:
    """Build a Recipe from nested data, over ``base``; unknown sections or keys raise LayercutError."""
    base = base or Recipe()
    classes = _section_classes()
    unknown = set(data) - set(classes)
    if unknown:
        raise LayercutError(f"unknown recipe section(s) {sorted(unknown)}; valid sections: {sorted(classes)}")
    sections = {}
    for name, cls in classes.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise LayercutError(f"recipe section {name!r} must be a mapping of option: value")
        valid = {f.name for f in fields(cls)}
        renamed = {alias.lstrip("-").replace("-", "_"): f.name for f in fields(cls)
                   for alias in f.metadata.get("aliases", ())}
        values = {renamed.get(key, key): value for key, value in values.items()}
        bad = set(values) - valid
        if bad:
            raise LayercutError(f"unknown key(s) {sorted(bad)} in recipe section {name!r}; valid keys: {sorted(valid)}")
        hints = typing.get_type_hints(cls)
        coerced = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
        sections[name] = dataclasses.replace(getattr(base, name), **coerced)
    return Recipe(**sections)


def load_recipe(path: str | Path, base: Recipe | None = None) -> Recipe:
    """Read a YAML recipe file over ``base``."""
    path = Path(path)
    if not path.is_file():
        raise LayercutError(f"recipe file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise LayercutError(f"recipe file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return from_dict(data, base)


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def _base_type(hint):
    """``int | None -> (int, True)``; ``Literal[...]`` stays as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0], True
    return hint, False


def _coerce(key: str, value: Any, hint) -> Any:
    base, optional = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise LayercutError(f"option {key!r} cannot be empty")
    origin = typing.get_origin(base)
    try:
        if origin is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise LayercutError(f"option {key!r} is {value!r}; valid values: {', '.join(map(str, choices))}")
            return value
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(str(item) for item in items)
        if base is bool:
            if not isinstance(value, bool):
                raise LayercutError(f"option {key!r} must be true or false, not {value!r}")
            return value
        return base(value)
    except (TypeError, ValueError):
        raise LayercutError(f"option {key!r} must be a {getattr(base, '__name__', base)}, not {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = SECTIONS,
                  exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per option of the given recipe sections (less ``exclude``); defaults are left out of the
    namespace so that the flags actually given are known."""
    classes = _section_classes()
    for name in sections:
        cls = classes[name]
        group = parser.add_argument_group(f"{name} options", cls.__doc__)
        hints = typing.get_type_hints(cls)
        for item in fields(cls):
            if item.name in exclude:
                continue
            flags = ["--" + item.name.replace("_", "-"), *item.metadata.get("aliases", ())]
            help_text = f"{item.metadata['help']} (default: {item.default})"
            base, _ = _base_type(hints[item.name])
            dest = f"{name}.{item.name}"
            if base is bool:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text)
            elif typing.get_origin(base) is Literal:
                group.add_argument(*flags, dest=dest, choices=typing.get_args(base), default=argparse.SUPPRESS,
                                   help=help_text)
            elif typing.get_origin(base) is tuple:
                group.add_argument(*flags, dest=dest, action="append", default=argparse.SUPPRESS, help=help_text,
                                   metavar=item.name.upper())
            else:
                group.add_argument(*flags, dest=dest, type=base, default=argparse.SUPPRESS, help=help_text,
                                   metavar=item.name.upper())


def recipe_from_arguments(arguments: argparse.Namespace, recipe_path: str | None = None) -> Recipe:
    """Defaults, then the YAML recipe (if any), then the flags given on the command line."""
    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    given: dict[str, dict] = {}
    for dest, value in vars(arguments).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            given.setdefault(section, {})[key] = value
    return from_dict(given, recipe)

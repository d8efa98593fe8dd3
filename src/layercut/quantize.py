"""The quantize stage: quantize a (pruned) checkpoint through a maintained library and save it as a checkpoint
transformers reloads, measured before and after.

Two routes, both thin: llm-compressor's ``oneshot`` (round-to-nearest or GPTQ; saved in the compressed-tensors
format that transformers and vLLM load) and a transformers ``quantization_config`` applied while loading
(bitsandbytes; runs quantized on the CPU). No quantization arithmetic lives here. :data:`SCHEMES` is the one
registry of schemes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layercut.errors import LayercutError
from layercut.files import check_output, staged_folder
from layercut.record import RECORD_FILE, Measures, Quantization, RunRecord, read_record
from layercut.report import quantization_card

if TYPE_CHECKING:
    from layercut.config import QuantizeOptions

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Scheme:
    """How one scheme is produced and what loading it needs."""

    description: str
    library: str  # the pip package that quantizes (its version goes into layercut.json)
    loader: str  # the pip package transformers needs to reload the saved checkpoint
    route: str  # "llmcompressor" (oneshot on the model in memory) or "transformers" (quantization_config)
    calibrated: bool = False  # needs calibration windows
    grouped: bool = False  # one scale (and zero point) per group of inputs: takes --group-size
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types the library can quantize and run it on


SCHEMES = {
    "int8": Scheme("8-bit weights, one scale per group of inputs (sized as for int4), round-to-nearest; "
                   "compressed-tensors (W8A16)", "llmcompressor", "compressed-tensors", "llmcompressor", grouped=True),
    "int4": Scheme("4-bit weights with a scale and zero point per group of 128 inputs (64 or 32 where 128 does not "
                   "divide), round-to-nearest; compressed-tensors (W4A16, asymmetric)",
                   "llmcompressor", "compressed-tensors", "llmcompressor", grouped=True),
    "gptq-w4a16": Scheme("4-bit weights, groups and zero points as int4, GPTQ on the calibration windows; "
                         "compressed-tensors (W4A16, asymmetric)",
                         "llmcompressor", "compressed-tensors", "llmcompressor", calibrated=True, grouped=True),
    "bnb-int8": Scheme("bitsandbytes LLM.int8: 8-bit weights that stay 8-bit in memory, also on the CPU",
                       "bitsandbytes", "bitsandbytes", "transformers"),
    "bnb-nf4": Scheme("bitsandbytes NF4: 4-bit normal-float weights, blocks of 64, stay 4-bit in memory",
                      "bitsandbytes", "bitsandbytes", "transformers"),
}

# llm-compressor preset names and the modules left in full precision (the output head is small next to the
# layers and the most sensitive to rounding). 4-bit uses a zero point per group: on SmolLM2 cut by 20 % (no repair) it
# cost +10.8 % perplexity with GPTQ against +21.8 % for the symmetric preset (vLLM's WNA16 kernels take both).
_LLMCOMPRESSOR_PRESETS = {"int8": "W8A16", "int4": "W4A16_ASYM", "gptq-w4a16": "W4A16_ASYM"}
_KEEP_FULL_PRECISION = ["lm_head"]
GROUP_SIZES = (128, 64, 32)  # group sizes vLLM's kernels take, preferred first


def check_scheme(scheme: str, device: str | torch.device = "cpu", calibration: bool = True) -> Scheme:
    """The :class:`Scheme` named ``scheme``; LayercutError when it is unknown, its package is missing, it
    cannot run on ``device``, or it needs calibration windows and ``calibration`` is False."""
    if scheme not in SCHEMES:
        listing = "; ".join(f"{name}: {spec.description}" for name, spec in SCHEMES.items())
        raise LayercutError(f"unknown quantization scheme {scheme!r}; choose one of: {listing}")
    spec = SCHEMES[scheme]
    device_type = torch.device(device).type
    if device_type not in spec.devices:
        others = [name for name, other in SCHEMES.items() if device_type in other.devices]
        raise LayercutError(f"scheme {scheme!r} needs a {' or '.join(spec.devices)} device, not {device_type}; "
                            f"on {device_type} use one of {', '.join(others)}")
    for package in dict.fromkeys((spec.library, spec.loader)):
        if find_spec(package.replace("-", "_")) is None:
            raise LayercutError(f"scheme {scheme!r} needs the {package} package: pip install 'layercut[quant]' "
                                f"(or pip install {package})")
    if spec.calibrated and not calibration:
        raise LayercutError(f"scheme {scheme!r} is calibrated: give calibration windows, or use "
                            f"{', '.join(name for name, other in SCHEMES.items() if not other.calibrated)}")
    return spec


def group_size(model, requested: int = 0) -> int:
    """``requested``, or when 0 the largest of :data:`GROUP_SIZES`, checked to divide the input width of every
    quantized ``nn.Linear``.

    4-bit groups must tile each weight row (SmolLM2's hidden 576 = 4.5 x 128 rules out 128, not 64).
    """
    choices = (requested,) if requested else GROUP_SIZES
    widths = {module.in_features for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in _KEEP_FULL_PRECISION}
    for size in choices:
        if all(width % size == 0 for width in widths):
            return size
    raise LayercutError(f"no 4-bit group size in {choices} divides the layer widths {sorted(widths)}; give a "
                        "--group-size that does, or use int8")


def modifier(scheme: str, model, group: int = 0):
    """The llm-compressor modifier that produces ``scheme`` on every ``nn.Linear`` except the output head;
    4-bit groups of ``group`` inputs (0: the largest of :data:`GROUP_SIZES` that fits)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    preset = preset_name_to_scheme(_LLMCOMPRESSOR_PRESETS[scheme], ["Linear"])
    if preset.weights.group_size:
        preset.weights.group_size = group_size(model, group)
    modifier = GPTQModifier if SCHEMES[scheme].calibrated else QuantizationModifier
    return modifier(config_groups={"group_0": preset}, ignore=_KEEP_FULL_PRECISION)


def transformers_config(scheme: str, dtype: torch.dtype):
    """The transformers ``quantization_config`` that produces ``scheme`` while a checkpoint loads."""
    from transformers import BitsAndBytesConfig

    if scheme == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def calibration_dataset(windows: torch.Tensor):
    """A ``datasets.Dataset`` of the token windows ``[N, T]`` as llm-compressor's ``oneshot`` reads them."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


def _oneshot(model, tokenizer, scheme: str, calibration_windows: torch.Tensor | None, group: int = 0):
    from llmcompressor import oneshot

    if not SCHEMES[scheme].calibrated:
        oneshot(model=model, recipe=modifier(scheme, model, group))
        return model
    count, length = calibration_windows.shape
    oneshot(model=model, processor=tokenizer, recipe=modifier(scheme, model, group),
            dataset=calibration_dataset(calibration_windows), max_seq_length=length, num_calibration_samples=count,
            shuffle_calibration_samples=False)
    return model


def _load_quantized(source: str | Path, scheme: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=str(device),
                                                quantization_config=transformers_config(scheme, dtype)).eval()


def quantize_model(model, tokenizer, scheme: str, calibration_windows: torch.Tensor | None = None, group: int = 0):
    """Return ``model`` quantized with ``scheme``; ``calibration_windows`` ``[N, T]`` token ids for GPTQ; ``group``
    the 4-bit group size (0: the largest of :data:`GROUP_SIZES` that fits).

    llm-compressor schemes change ``model`` in place (and return it); bitsandbytes schemes return a new model
    loaded from a temporary copy of ``model`` with a transformers ``quantization_config``.
    """
    device = next(model.parameters()).device
    spec = check_scheme(scheme, device, calibration_windows is not None)
    logger.info("quantizing with %s (%s)", scheme, spec.library)
    if spec.route == "llmcompressor":
        return _oneshot(model, tokenizer, scheme, calibration_windows, group)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        return _load_quantized(scratch, scheme, next(model.parameters()).dtype, device)


def weights_size(folder: str | Path) -> int:
    """Bytes of weight files (safetensors, bin, pt) directly in ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.suffix in WEIGHT_SUFFIXES)


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def quantization_entry(scheme: str, size_before: int, size_after: int, calibration_windows: torch.Tensor | None,
                       group: int | None, before: Measures, after: Measures) -> Quantization:
    """The ``quantization`` entry of ``layercut.json``."""
    spec = SCHEMES[scheme]
    return Quantization(
        scheme=scheme, description=spec.description, library=spec.library,
        library_version=package_version(spec.library), loader=spec.loader, loader_version=package_version(spec.loader),
        size_before_bytes=size_before, size_after_bytes=size_after,
        size_ratio=size_after / size_before if size_before else None,
        calibration_windows=list(calibration_windows.shape) if spec.calibrated else None,
        group_size=group if spec.grouped else None, before=before, after=after)


@torch.no_grad()
def footprint(model) -> int:
    """Bytes the model's parameters and buffers take once it has run: one forward pass of one token first, since
    some loaders unpack weights on first use (compressed-tensors on the CPU keeps them unpacked afterwards)."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.get_input_embeddings().weight.device))
    return int(model.get_memory_footprint())


Evaluate = Callable[..., Measures]  # (model, tokenizer) -> Measures


def _measured(model, tokenizer, evaluate: Evaluate | None, device: torch.device, known: Measures | None = None
              ) -> Measures:
    """``evaluate(model, tokenizer)`` (or the ``known`` measures), then :func:`footprint`, plus the peak GPU bytes
    of both on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = known.model_copy() if known is not None else evaluate(model, tokenizer) if evaluate else Measures()
    result.memory_footprint_bytes = footprint(model)
    if device.type == "cuda":
        result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(device))
    return result


def _copy_missing(source: Path, target: Path) -> None:
    """Copy the files of ``source`` that ``target`` lacks (tokenizer, recipe, plots), never its weights."""
    for path in source.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name not in WEIGHT_INDEXES \
                and not (target / path.name).exists():
            shutil.copyfile(path, target / path.name)


def quantize_checkpoint(source_dir: str | Path, output_dir: str | Path, options: QuantizeOptions,
                        calibration_windows: torch.Tensor | None = None, overwrite: bool = False,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        evaluate: Evaluate | None = None, source_measures: Measures | None = None) -> Path:
    """Quantize the checkpoint in ``source_dir`` with ``options.quantize`` and write it to ``output_dir`` atomically.

    The output keeps the source's tokenizer and side files; ``layercut.json`` gains a ``quantization`` entry
    (scheme, library and version, weight bytes on disk and parameter bytes in memory before and after) and
    ``README.md`` a section naming the package the loader needs. ``evaluate(model, tokenizer) -> Measures`` (e.g.
    perplexity and zero-shot accuracy) is applied to the written checkpoint reloaded the way ``layercut eval``
    loads it, and to the source before quantizing unless ``source_measures`` already holds its results.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layercut.load import DTYPES, open_model

    scheme = options.quantize
    source, device = Path(source_dir), torch.device(device)
    output = check_output(output_dir, overwrite, protected=[source])
    spec = check_scheme(scheme, device, calibration_windows is not None)
    if not (source / "config.json").is_file():
        raise LayercutError(f"{source} has no config.json; give a folder written by layercut prune or save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    before = _measured(model, tokenizer, evaluate, device, source_measures)
    group = None
    if spec.route == "llmcompressor":
        if spec.grouped:
            group = group_size(model, options.group_size)
        model = quantize_model(model, tokenizer, scheme, calibration_windows, group or 0)
    else:
        del model
        model = _load_quantized(source, scheme, dtype, device)
    with staged_folder(output, overwrite, protected=[source]) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
        reloaded = open_model(str(staging), dtype_name, str(device)).model
        after = _measured(reloaded, tokenizer, evaluate, device)
        del reloaded
        entry = quantization_entry(scheme, weights_size(source), weights_size(staging), calibration_windows, group,
                                   before, after)
        record = read_record(source) if (source / RECORD_FILE).is_file() else RunRecord(source=str(source))
        record.quantization = entry
        (staging / RECORD_FILE).write_text(record.to_json())
        readme = (source / "README.md").read_text() if (source / "README.md").is_file() else ""
        (staging / "README.md").write_text(readme + quantization_card(entry))
        _copy_missing(source, staging)
    logger.info("wrote %s (%s, %.1f -> %.1f MiB of weights)", output, scheme, entry.size_before_bytes / 2**20,
                entry.size_after_bytes / 2**20)
    return output

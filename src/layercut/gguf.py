"""GGUF export for llama.cpp (and Ollama): llama.cpp's own converter and quantizer, then a parity check that loads the
GGUF in llama.cpp and compares its outputs with the transformers model on held-out windows.

Nothing here converts or quantizes weights itself. The converter (``convert_hf_to_gguf.py`` with its
``conversion`` package and ``gguf-py``) comes from the pinned llama-cpp-python sdist, fetched once into the layercut
cache and checked against its checksum; the quantizer and the runtime are the llama.cpp library that the
``llama-cpp-python`` wheel built from that same sdist holds. :data:`GGUF_TYPES` is the registry of GGUF types.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layercut.assets import cache_dir
from layercut.errors import LayercutError
from layercut.files import staged_folder
from layercut.record import GgufExport, GgufParity

logger = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_REQUIREMENT = f"llama-cpp-python=={LLAMA_CPP_VERSION}"
LLAMA_CPP_SDIST = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")  # under vendor/llama.cpp/ in the sdist
INSTALL_HINT = "pip install 'layercut[gguf]' (builds llama.cpp from source: about 8 minutes on 2 cores)"


@dataclass(frozen=True)
class GgufType:
    """One GGUF weight type: how llama.cpp produces it and how far its outputs may stray from transformers'.

    The bounds were set from measurements on SmolLM2-135M, dense and cut (bench/gguf_parity.py,
    bench/results/gguf-cpu/): at least twice the largest perplexity change, KL and top-1 disagreement seen; f16
    is held to 1 % perplexity, a few hundred times what was seen.
    """

    description: str
    ftype: str | None  # llama_cpp.LLAMA_FTYPE_* that llama_model_quantize writes; None: the converter writes it
    max_perplexity_change: float  # |perplexity(llama.cpp) / perplexity(transformers) - 1|
    max_kl: float  # mean KL(transformers || llama.cpp) per token, nats
    min_top1: float  # fraction of positions where both pick the same next token


GGUF_TYPES = {
    "f16": GgufType("16-bit floats, written by llama.cpp's converter", None, 0.01, 0.001, 0.98),
    "q8_0": GgufType("8-bit blocks of 32 weights, llama.cpp's quantizer", "LLAMA_FTYPE_MOSTLY_Q8_0", 0.02, 0.015, 0.9),
    "q4_k_m": GgufType("4-bit k-quants (mixed 4/6-bit), llama.cpp's quantizer", "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                       0.2, 0.2, 0.7),
}


def check_llama_cpp() -> None:
    """Raise LayercutError unless the pinned llama-cpp-python is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("llama-cpp-python")
    except PackageNotFoundError:
        raise LayercutError(f"--format gguf needs llama.cpp: {INSTALL_HINT}") from None
    if found != LLAMA_CPP_VERSION:
        raise LayercutError(f"--format gguf is checked against llama-cpp-python {LLAMA_CPP_VERSION}, not {found}: "
                            f"pip install '{LLAMA_CPP_REQUIREMENT}' (or pip install 'layercut[gguf]')")


# ----------------------------------------------------------------------------------------------- converter


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python sdist in the layercut cache (``pip download`` once), checked by sha256."""
    folder = cache_dir() / "sdist"
    path = folder / LLAMA_CPP_SDIST
    if not path.is_file():
        logger.info("downloading the %s sdist (llama.cpp's converter) into %s", LLAMA_CPP_REQUIREMENT, folder)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               ":all:", LLAMA_CPP_REQUIREMENT, "-d", str(folder)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not path.is_file():
            raise LayercutError(f"cannot download the {LLAMA_CPP_REQUIREMENT} sdist, which holds llama.cpp's "
                                f"converter ({(done.stderr or done.stdout).strip().splitlines()[-1:]}); connect to "
                                f"PyPI, or put {LLAMA_CPP_SDIST} into {folder}")
    if sha256(path) != LLAMA_CPP_SDIST_SHA256:
        path.unlink()
        raise LayercutError(f"{path} does not match the published sha256 of {LLAMA_CPP_REQUIREMENT}; it was "
                            "deleted: run again to download it afresh")
    return path


def converter_dir() -> Path:
    """A folder holding llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` and ``gguf-py`` packages,
    extracted once from the pinned sdist into the layercut cache."""
    target = cache_dir() / "llama.cpp" / LLAMA_CPP_VERSION
    if (target / CONVERTER).is_file():
        return target
    sdist = fetch_sdist()
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    with staged_folder(target, overwrite=True, marker=None) as staging, tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.isfile() and member.name.startswith(prefix)
                   and member.name[len(prefix):].startswith(CONVERTER_PARTS)]
        for member in members:
            member.name = member.name[len(prefix):]
            archive.extract(member, staging, filter="data")
    logger.info("extracted llama.cpp's converter into %s", target)
    return target


def convert(checkpoint: Path, outfile: Path, outtype: str = "f16") -> Path:
    """Convert the transformers checkpoint folder ``checkpoint`` into the GGUF ``outfile`` with llama.cpp's own
    ``convert_hf_to_gguf.py`` (run in a subprocess with this Python)."""
    script = converter_dir() / CONVERTER
    command = [sys.executable, str(script), str(checkpoint), "--outfile", str(outfile), "--outtype", outtype]
    environment = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0 or not outfile.is_file():
        last = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-3:]
        raise LayercutError(f"llama.cpp's converter (from {LLAMA_CPP_REQUIREMENT}) cannot convert this model: "
                            f"{' | '.join(last)[-600:]}; its architecture or tokenizer may be one that llama.cpp "
                            "does not support: export without --format gguf (transformers, vLLM)")
    return outfile


def quantize(source: Path, target: Path, ftype_name: str) -> Path:
    """Quantize the GGUF ``source`` into ``target`` with llama.cpp's ``llama_model_quantize``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = os.cpu_count() or 1
    with captured_llama_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise LayercutError(f"llama.cpp's quantizer failed on {source.name} ({ftype_name}, status {status}): "
                            f"{''.join(lines[-3:]).strip()[-400:]}")
    return target


# ----------------------------------------------------------------------------------------------- runtime


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (all levels) while the block runs, then give logging back to
    llama-cpp-python."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


SWA_LINE = re.compile(r"layer\s+(\d+) assigned to device .*, is_swa = (\d)")


def sliding_layers_from_log(lines: Sequence[str], num_layers: int) -> list[bool] | None:
    """Which of the first ``num_layers`` layers llama.cpp runs with sliding-window attention, read from its load
    log (``load_tensors: layer N assigned to device ..., is_swa = 0/1``); None when the log does not say."""
    found = {}
    for line in lines:
        match = SWA_LINE.search(line)
        if match:
            found[int(match[1])] = match[2] == "1"
    if not all(index in found for index in range(num_layers)):
        return None
    return [found[index] for index in range(num_layers)]


@dataclass
class Loaded:
    """A GGUF loaded in llama.cpp, what its loader derived from the file, and its log."""

    llama: object  # llama_cpp.Llama
    description: str  # llama_model_desc: "<arch> <type> <file type>"; type "?B" when the layer count is unknown
    sliding: list[bool] | None
    log: list[str]


def load_gguf(path: Path, context: int, num_layers: int) -> Loaded:
    """Load ``path`` in llama.cpp on the CPU with logits for every position of up to ``context`` tokens."""
    from llama_cpp import Llama

    with captured_llama_log() as lines:
        try:
            llama = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                          n_threads=os.cpu_count() or 1, n_gpu_layers=0, verbose=False)
        except ValueError as error:
            errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
            raise LayercutError(f"llama.cpp ({LLAMA_CPP_REQUIREMENT}) cannot load the GGUF its converter wrote "
                                f"({error}: {' | '.join(errors[-3:])[-400:]}); use the transformers checkpoint "
                                "(export without --format gguf)") from None
    buffer = ctypes.create_string_buffer(256)
    import llama_cpp

    llama_cpp.llama_model_desc(llama.model, buffer, len(buffer))
    return Loaded(llama, buffer.value.decode(), sliding_layers_from_log(lines, num_layers), lines)


def llama_logits(loaded: Loaded, tokens: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits ``[T, V]`` for the token window ``tokens`` ``[T]``, from a fresh context."""
    llama = loaded.llama
    llama.reset()
    llama.eval(tokens.tolist())
    return torch.from_numpy(llama.scores[: tokens.numel()].copy())


# ----------------------------------------------------------------------------------------------- parity math


def parity_sums(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor, chunk: int = 64
                ) -> torch.Tensor:
    """Sums over the positions that predict a next token of one window: ``[nll reference, nll candidate, same
    top-1, KL(reference || candidate), positions]``, in float64, ``chunk`` positions at a time.

    ``reference`` and ``candidate`` are logits ``[T, V]`` of the window ``tokens`` ``[T]``; only their first
    ``min(V)`` columns are compared (a converter may drop padding rows of the vocabulary), renormalised.
    """
    vocab = min(reference.shape[-1], candidate.shape[-1])
    total = torch.zeros(5, dtype=torch.float64)
    for start in range(0, tokens.numel() - 1, chunk):
        end = min(start + chunk, tokens.numel() - 1)
        log_p = torch.log_softmax(reference[start:end, :vocab].double(), -1)
        log_q = torch.log_softmax(candidate[start:end, :vocab].double(), -1)
        targets = tokens[start + 1:end + 1].long()[:, None]
        total += torch.stack([-log_p.gather(-1, targets).sum(), -log_q.gather(-1, targets).sum(),
                              (log_p.argmax(-1) == log_q.argmax(-1)).sum().double(),
                              (log_p.exp() * (log_p - log_q)).sum(), torch.tensor(end - start, dtype=torch.float64)])
    return total


def parity_figures(sums: torch.Tensor) -> dict[str, float]:
    """Perplexities, their relative change, top-1 agreement and mean KL from summed :func:`parity_sums`."""
    nll_p, nll_q, same, kl, count = sums.tolist()
    reference, candidate = math.exp(nll_p / count), math.exp(nll_q / count)
    return {"perplexity_transformers": reference, "perplexity_llama_cpp": candidate,
            "perplexity_change": candidate / reference - 1, "top1_agreement": same / count, "mean_kl": kl / count}


def parity_problems(figures: dict[str, float], gguf_type: str) -> list[str]:
    """What in ``figures`` lies beyond the bounds of ``gguf_type`` (empty: within)."""
    bound = GGUF_TYPES[gguf_type]
    problems = []
    if not abs(figures["perplexity_change"]) <= bound.max_perplexity_change:
        problems.append(f"perplexity {figures['perplexity_llama_cpp']:.4g} in llama.cpp against "
                        f"{figures['perplexity_transformers']:.4g} in transformers "
                        f"({figures['perplexity_change']:+.2%}; bound ±{bound.max_perplexity_change:.0%})")
    if not figures["mean_kl"] <= bound.max_kl:
        problems.append(f"mean KL {figures['mean_kl']:.4g} nats/token (bound {bound.max_kl})")
    if not figures["top1_agreement"] >= bound.min_top1:
        problems.append(f"top-1 agreement {figures['top1_agreement']:.1%} (bound {bound.min_top1:.0%})")
    return problems


@torch.no_grad()
def measure_parity(model, loaded: Loaded, windows: torch.Tensor) -> dict[str, float]:
    """Parity figures of llama.cpp against the transformers ``model`` on ``windows`` ``[N, T]``, one window at a
    time (each from an empty cache)."""
    device = next(model.parameters()).device
    total = torch.zeros(5, dtype=torch.float64)
    for window in windows:
        reference = model(input_ids=window[None].to(device)).logits[0].float().cpu()
        total += parity_sums(reference, llama_logits(loaded, window), window)
    return parity_figures(total)


# ----------------------------------------------------------------------------------------------- layer pattern


def expected_sliding(config) -> list[bool]:
    """Which decoder layers transformers runs with a sliding window: ``layer_types`` where the config has it,
    else every layer when it sets ``sliding_window`` (and does not switch it off), else none."""
    total = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types:
        return [kind != "full_attention" for kind in types]
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
    return [bool(windowed)] * total


def pattern_problem(expected: list[bool], sliding: list[bool] | None, window: int | None) -> str | None:
    """Why llama.cpp would run the layers differently from transformers, or None when they agree."""
    if sliding is None:
        return None if not any(expected) else "llama.cpp's load log did not say which layers use a sliding window"
    wrong = [index for index, (want, got) in enumerate(zip(expected, sliding)) if want != got]
    if not wrong:
        return None
    names = {True: "sliding-window", False: "full"}
    shown = ", ".join(f"{i} ({names[sliding[i]]} instead of {names[expected[i]]})" for i in wrong[:6])
    return (f"llama.cpp runs decoder layer(s) {shown}{' ...' if len(wrong) > 6 else ''} with another attention "
            f"than transformers (config.layer_types); outputs differ on prompts longer than the "
            f"{window or '?'}-token window")


def write_sliding_pattern(path: Path, target: Path, expected: list[bool]) -> Path:
    """Copy the GGUF ``path`` to ``target`` with ``<arch>.attention.sliding_window_pattern`` set to one flag per
    layer (``expected``), the form llama.cpp's loader reads before its built-in period; with llama.cpp's gguf-py
    (the ``gguf`` package)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    details = MetadataDetails(gguf.GGUFValueType.ARRAY, list(expected), sub_type=gguf.GGUFValueType.BOOL)
    copy_with_new_metadata(reader, writer, {key: details}, [])
    return target


# ----------------------------------------------------------------------------------------------- the export


def gguf_name(gguf_type: str) -> str:
    return f"model.{gguf_type}.gguf"


def export_ggufs(model, folder: Path, windows: torch.Tensor, types: Sequence[str], layer_pattern: str = "check",
                 scratch: Path | None = None) -> list[GgufExport]:
    """Write ``folder``/model.<type>.gguf for each of ``types`` from the checkpoint saved in ``folder``, each checked
    against the transformers ``model`` on the held-out token windows ``windows`` ``[N, T]``.

    llama.cpp's converter writes f16 once (into ``scratch`` unless f16 is asked for); its quantizer makes the other
    types from it. A layer-pattern mismatch is refused (``layer_pattern`` "check"), fixed by writing one flag per
    layer into the GGUF ("write") or recorded ("ignore"). Raises LayercutError when llama.cpp's outputs lie beyond
    :data:`GGUF_TYPES`' bounds; the caller writes into a staging folder, so nothing is left behind.
    """
    check_llama_cpp()
    scratch = scratch or folder
    f16 = convert(folder, (folder if "f16" in types else scratch) / gguf_name("f16"), "f16")
    entries = []
    for gguf_type in types:
        target = folder / gguf_name(gguf_type)
        if GGUF_TYPES[gguf_type].ftype is not None:
            quantize(f16, target, GGUF_TYPES[gguf_type].ftype)
        entries.append(checked_gguf(model, target, gguf_type, windows, layer_pattern))
    return entries


def checked_gguf(model, path: Path, gguf_type: str, windows: torch.Tensor, layer_pattern: str) -> GgufExport:
    """Load the GGUF ``path`` in llama.cpp, check its layer pattern and its parity with ``model``; its record."""
    spec = GGUF_TYPES[gguf_type]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    loaded, pattern, warnings = checked_load(path, text, windows.shape[1], layer_pattern)
    try:
        figures = measure_parity(model, loaded, windows)
    finally:
        loaded.llama.close()
    problems = parity_problems(figures, gguf_type)
    if problems:
        raise LayercutError(
            f"the {gguf_type} GGUF disagrees with the transformers model beyond what {gguf_type} explains: "
            f"{'; '.join(problems)} ({windows.shape[0]} windows of {windows.shape[1]} tokens); nothing was "
            f"written. llama.cpp ({loaded.description}) may derive a setting differently for this model: use the "
            "transformers checkpoint (export without --format gguf; vLLM loads it), or another --gguf-type")
    logger.info("%s: llama.cpp perplexity %.4g vs transformers %.4g, top-1 %.1f%%, KL %.2g", path.name,
                figures["perplexity_llama_cpp"], figures["perplexity_transformers"],
                100 * figures["top1_agreement"], figures["mean_kl"])
    bounds = {"perplexity_change": spec.max_perplexity_change, "mean_kl": spec.max_kl,
              "top1_agreement": spec.min_top1}
    return GgufExport(file=path.name, type=gguf_type, description=spec.description, size_bytes=path.stat().st_size,
                      llama_cpp=f"{LLAMA_CPP_REQUIREMENT} (converter: sdist sha256 {LLAMA_CPP_SDIST_SHA256[:12]}...)",
                      model_description=loaded.description, layer_pattern=pattern, warnings=warnings,
                      parity=GgufParity(windows=windows.shape[0], seq_len=windows.shape[1], bounds=bounds, **figures))


def checked_load(path: Path, config, context: int, layer_pattern: str) -> tuple[Loaded, str, list[str]]:
    """Load the GGUF and check the attention llama.cpp gives each layer and the settings it derives from the layer
    count; returns the loaded model, how the layer pattern was handled, and warnings."""
    expected = expected_sliding(config)
    window = getattr(config, "sliding_window", None)
    loaded = load_gguf(path, context, len(expected))
    problem = pattern_problem(expected, loaded.sliding, window)
    warnings = [derived_type_warning(loaded.description, len(expected))] if "?B" in loaded.description else []
    for warning in warnings:
        logger.warning("%s", warning)
    if problem is None:
        return loaded, "matches", warnings
    if layer_pattern == "ignore":
        logger.warning("%s; exported anyway (--gguf-layer-pattern ignore)", problem)
        return loaded, f"ignored: {problem}", [*warnings, problem]
    if layer_pattern == "check":
        loaded.llama.close()
        raise LayercutError(
            f"{problem}. The cut changed where full-attention layers sit, and llama.cpp derives them from a fixed "
            "period, not from config.layer_types. Choices: search a cut that keeps the period (--keep-period) or "
            "give one (--segment); use the transformers/vLLM route, which reads layer_types (export without "
            "--format gguf); or --gguf-layer-pattern write (store one flag per layer in the GGUF, which this "
            f"llama.cpp reads) or ignore")
    loaded.llama.close()
    fixed = write_sliding_pattern(path, path.with_name(path.name + ".pattern"), expected)
    os.replace(fixed, path)
    loaded = load_gguf(path, context, len(expected))
    problem = pattern_problem(expected, loaded.sliding, window)
    if problem is not None:
        loaded.llama.close()
        raise LayercutError(f"{problem}, even with one flag per layer written into the GGUF (llama.cpp's loader for "
                            "this architecture does not read them); use the transformers/vLLM route or --keep-period")
    return loaded, "written: one sliding-window flag per layer", warnings


def derived_type_warning(description: str, num_layers: int) -> str:
    """The warning for a layer count that llama.cpp does not recognise as a model type."""
    return (f"llama.cpp derives the model type from the layer count and does not recognise {num_layers} layers "
            f"({description}); settings it takes from the type (for Gemma-2/3 27B, the query scale) fall back to "
            "their defaults. The parity check below measures whether the outputs still agree.")

"""How far llama.cpp's outputs stray from transformers' for layercut's GGUF exports, on the CPU.

Part 1 (SmolLM2-135M): the dense model and a cut of 6 of its 30 layers (no repair), each saved as a checkpoint,
converted by llama.cpp's converter to f16 and quantized by its quantizer to q8_0 and q4_k_m, then compared with the
transformers model on held-out wiki windows: perplexity, top-1 agreement, mean KL (the figures
``layercut.gguf.GGUF_TYPES``' bounds come from).

Part 2 (Gemma-3-270M, ``--gemma``): cuts of 4 and of 6 of its 18 layers, f16, compared on windows longer than its
512-token sliding window, separately on the positions inside and past the window; once as converted and once with
one sliding-window flag per layer written into the GGUF. It also records which layers llama.cpp runs with a
sliding window against config.layer_types.

Writes ``gguf_parity.json`` and ``README.md`` into ``--out``:

    python bench/gguf_parity.py --out bench/results/gguf-cpu --gemma
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from layercut.config import ModelOptions
from layercut.data import evaluation_windows, load_text
from layercut.gguf import (
    GGUF_TYPES,
    LLAMA_CPP_REQUIREMENT,
    convert,
    expected_sliding,
    gguf_name,
    llama_logits,
    load_gguf,
    parity_figures,
    parity_sums,
    quantize,
    write_sliding_pattern,
)
from layercut.layers import cut, text_config
from layercut.load import load_model
from layercut.record import library_versions

logger = logging.getLogger("bench.gguf_parity")


def save(handle, folder: Path) -> Path:
    handle.model.save_pretrained(folder)
    handle.tokenizer.save_pretrained(folder)
    return folder


def smollm2_case(segment: tuple[int, int] | None, windows: torch.Tensor, work: Path) -> dict:
    """Parity of f16, q8_0 and q4_k_m GGUFs of SmolLM2 (dense, or with ``segment`` cut) on ``windows``."""
    handle = load_model("smollm2-135m", ModelOptions(device="cpu", dtype="float32"))
    if segment is not None:
        cut(handle, [segment])
    folder = save(handle, work / f"smollm2-{'dense' if segment is None else f'{segment[0]}-{segment[1]}'}")
    f16 = convert(folder, folder / gguf_name("f16"))
    with torch.no_grad():  # the transformers side once for all types
        references = [handle.model(input_ids=tokens[None]).logits[0] for tokens in windows]
    rows = {}
    for gguf_type, spec in GGUF_TYPES.items():
        path = f16 if spec.ftype is None else quantize(f16, folder / gguf_name(gguf_type), spec.ftype)
        loaded = load_gguf(path, windows.shape[1], handle.num_layers)
        started = time.perf_counter()
        figures = parity_figures(sum(parity_sums(reference, llama_logits(loaded, tokens), tokens)
                                     for reference, tokens in zip(references, windows)))
        loaded.llama.close()
        rows[gguf_type] = {**figures, "file_mib": path.stat().st_size / 2**20, "model": loaded.description,
                           "seconds": time.perf_counter() - started}
        logger.info("smollm2 %s %s: %s", segment, gguf_type, rows[gguf_type])
    return {"segment": segment, "layers": handle.num_layers, "types": rows}


@torch.no_grad()
def split_parity(model, loaded, windows: torch.Tensor, window: int) -> dict:
    """Parity figures on the positions that predict tokens 1..window (inside the sliding window) and past it."""
    inside, past = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for tokens in windows:
        reference = model(input_ids=tokens[None]).logits[0].float()
        candidate = llama_logits(loaded, tokens)
        inside += parity_sums(reference[:window], candidate[:window], tokens[:window])
        past += parity_sums(reference[window - 1:], candidate[window - 1:], tokens[window - 1:])
    return {"inside_window": parity_figures(inside), "past_window": parity_figures(past)}


def gemma_case(segment: tuple[int, int], windows: torch.Tensor, work: Path) -> dict:
    """Gemma-3-270M with ``segment`` cut, f16: llama.cpp's layers and parity, as converted and with flags written."""
    handle = load_model("gemma3-270m", ModelOptions(device="cpu", dtype="float32"))
    cut(handle, [segment])
    config = text_config(handle.model)
    folder = save(handle, work / f"gemma3-{segment[0]}-{segment[1]}")
    expected = expected_sliding(config)
    result = {"segment": segment, "layers": handle.num_layers, "layer_types": list(config.layer_types),
              "sliding_window": config.sliding_window}
    f16 = convert(folder, folder / gguf_name("f16"))
    written = write_sliding_pattern(f16, folder / "model.f16.flags.gguf", expected)
    for name, path in (("as_converted", f16), ("flags_written", written)):
        loaded = load_gguf(path, windows.shape[1], handle.num_layers)
        figures = split_parity(handle.model, loaded, windows, config.sliding_window)
        result[name] = {"llama_cpp_sliding": loaded.sliding, "matches_layer_types": loaded.sliding == expected,
                        "model": loaded.description, **figures}
        loaded.llama.close()
        logger.info("gemma3 %s %s: %s", segment, name, result[name])
    return result


def table(results: dict) -> str:
    lines = ["## SmolLM2-135M: llama.cpp against transformers", "",
             f"{results['smollm2_windows']} wiki test windows of {results['smollm2_seq_len']} tokens.", "",
             "| model | type | MiB | ppl transformers | ppl llama.cpp | change | top-1 | mean KL |",
             "|---|---|---|---|---|---|---|---|"]
    for case in results["smollm2"]:
        name = "dense (30 layers)" if case["segment"] is None else f"cut [{case['segment'][0]}:{case['segment'][1]}) " \
                                                                   f"({case['layers']} layers, no repair)"
        for gguf_type, row in case["types"].items():
            lines.append(f"| {name} | {gguf_type} | {row['file_mib']:.0f} | {row['perplexity_transformers']:.3f} | "
                         f"{row['perplexity_llama_cpp']:.3f} | {row['perplexity_change']:+.2%} | "
                         f"{row['top1_agreement']:.1%} | {row['mean_kl']:.4f} |")
    if results.get("gemma3"):
        lines += ["", "## Gemma-3-270M cut: which layers llama.cpp runs with a sliding window", "",
                  (f"{results['gemma_windows']} wiki test windows of {results['gemma_seq_len']} tokens (sliding "
                   "window 512); f16 GGUF; figures on the positions inside the window and past it."), "",
                  ("| cut | GGUF | llama.cpp layers = layer_types | top-1 inside | KL inside | top-1 past | KL past | "
                   "ppl past: transformers / llama.cpp |"), "|---|---|---|---|---|---|---|---|"]
        for case in results["gemma3"]:
            for name in ("as_converted", "flags_written"):
                row = case[name]
                inside, past = row["inside_window"], row["past_window"]
                lines.append(f"| [{case['segment'][0]}:{case['segment'][1]}) | {name.replace('_', ' ')} | "
                             f"{row['matches_layer_types']} | {inside['top1_agreement']:.1%} | "
                             f"{inside['mean_kl']:.4f} | {past['top1_agreement']:.1%} | {past['mean_kl']:.4f} | "
                             f"{past['perplexity_transformers']:.2f} / {past['perplexity_llama_cpp']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--segment", default="12:18", help="the SmolLM2 cut (START:END)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gemma", action="store_true", help="also the Gemma-3-270M layer-pattern measurement")
    parser.add_argument("--gemma-windows", type=int, default=2)
    parser.add_argument("--gemma-seq-len", type=int, default=768)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"command": "python bench/gguf_parity.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                    vars(arguments).items() if v not in (False, None)),
               "llama_cpp": LLAMA_CPP_REQUIREMENT, "versions": library_versions(), "machine": platform.processor()
               or platform.machine(), "smollm2_windows": arguments.windows, "smollm2_seq_len": arguments.seq_len}
    start, end = (int(part) for part in arguments.segment.split(":"))
    with tempfile.TemporaryDirectory() as scratch:
        handle = load_model("smollm2-135m", ModelOptions(device="cpu"))
        windows = evaluation_windows(handle.tokenizer, load_text("wiki", "test"), arguments.seq_len, arguments.windows)
        del handle
        results["smollm2"] = [smollm2_case(None, windows, Path(scratch)),
                              smollm2_case((start, end), windows, Path(scratch))]
        if arguments.gemma:
            gemma = load_model("gemma3-270m", ModelOptions(device="cpu"))
            long = evaluation_windows(gemma.tokenizer, load_text("wiki", "test"), arguments.gemma_seq_len,
                                      arguments.gemma_windows)
            del gemma
            results.update(gemma_windows=arguments.gemma_windows, gemma_seq_len=arguments.gemma_seq_len)
            results["gemma3"] = [gemma_case(segment, long, Path(scratch)) for segment in ((6, 10), (6, 12), (14, 18))]
    results["seconds"] = time.perf_counter() - started
    (out / "gguf_parity.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "README.md").write_text(f"# GGUF parity on the CPU\n\n`{results['command']}` ({LLAMA_CPP_REQUIREMENT}, "
                                   f"{results['seconds']:.0f} s)\n\n" + table(results))


if __name__ == "__main__":
    main()

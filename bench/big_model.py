"""Cost of layercut on a real model shape: a random-init Llama-3-8B-shaped model in bf16 on one GPU.

Measures gate-search time per step and in total and its peak GPU memory against the bf16 weight bytes, the
exhaustive oracle's time, cut and save time, and prefill/decode throughput dense vs pruned next to L/(L−n).
Random weights make the chosen segment meaningless; only cost is measured. Results are rewritten after every
stage into ``--out``/big_model.json and big_model.md.

    python bench/big_model.py --out bench/results/big-8b-h200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from layercut.evaluate import throughput
from layercut.export import library_versions
from layercut.gate import search_segments
from layercut.layers import drop_layers

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}


def gib(count: int) -> float:
    return count / 2**30


def write(result: dict, out: Path) -> None:
    (out / "big_model.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# {result['shape']} (random init, bf16) on {result['device']}", "", f"Command: `{result['command']}`",
             "", "| measure | value |", "|---|---|"]
    lines += [f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in result["measures"].items()]
    (out / "big_model.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profiles", type=int, default=2)
    parser.add_argument("--step-windows", type=int, default=1)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    arguments = parser.parse_args()
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    started = time.perf_counter()
    with device:
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).eval()
    torch.set_default_dtype(torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = model.config.num_hidden_layers
    result = {"shape": "Llama-3-8B", "device": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv),
              "settings": vars(arguments), "versions": library_versions(),
              "measures": {"build seconds": time.perf_counter() - started, "weights GiB (bf16)": gib(weights)}}
    measures = result["measures"]
    write(result, out)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, LLAMA3_8B["vocab_size"], (arguments.calib_windows, arguments.seq_len),
                            generator=generator)

    measures.update({f"dense {k}": v for k, v in throughput(model, prompt_tokens=256, new_tokens=64).items()
                     if k.endswith("per_s")})
    write(result, out)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    found = search_segments(model, windows, arguments.remove, "clp", profiles=arguments.profiles,
                            steps=arguments.steps, step_windows=arguments.step_windows, batch_size=4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    measures.update({
        "gate rows per step (profiles x windows)": arguments.profiles * arguments.step_windows,
        "gate total seconds": found.seconds, "gate cuts scored exactly": found.evaluations,
        "gate peak GiB": gib(peak), "gate peak / weights": peak / weights,
    })
    write(result, out)
    oracle = search_segments(model, windows, arguments.remove, "exhaustive", batch_size=4)
    measures.update({"exhaustive seconds": oracle.seconds, "exhaustive cuts scored": oracle.evaluations})
    write(result, out)

    start = time.perf_counter()
    drop_layers(model, found.segments)
    measures["cut seconds"] = time.perf_counter() - start
    measures.update({f"pruned {k}": v for k, v in throughput(model, prompt_tokens=256, new_tokens=64).items()
                     if k.endswith("per_s")})
    for kind in ("prefill", "decode"):
        measures[f"{kind} ratio"] = measures[f"pruned {kind}_tokens_per_s"] / measures[f"dense {kind}_tokens_per_s"]
    measures["limit L/(L-n)"] = layers / (layers - arguments.remove)
    write(result, out)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model.save_pretrained(folder)
        measures["save_pretrained seconds (pruned)"] = time.perf_counter() - start
    write(result, out)
    print((out / "big_model.md").read_text())


if __name__ == "__main__":
    main()

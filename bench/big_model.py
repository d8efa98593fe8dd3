"""Cost of layercut on real model shapes: random-init Llama-3-8B / -70B-shaped models in bf16, on one or more GPUs.

Builds the model with empty weights, places it with accelerate (one GPU, or ``infer_auto_device_map`` +
``dispatch_model`` over several) and fills the weights with random values on their devices. Then measures:
gate-search time per step and in total and peak GPU memory against the bf16 weight bytes (with and without
per-layer activation checkpointing), the exhaustive oracle's time, cut time, endpoint repair time and memory,
prefill/decode throughput dense vs pruned next to L/(L−n), and ``save_pretrained`` time. Random weights make
the chosen segment meaningless; only cost is measured. Results are rewritten after every stage into
``--out``/big_model.json and big_model.md.

    python bench/big_model.py --shape llama3-8b --out bench/results/big-models/big-8b-h200
    python bench/big_model.py --shape llama3-70b --gpus 2 --out bench/results/big-models/big-70b-2xh200
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import LlamaConfig, LlamaForCausalLM

from layercut import heal, selection
from layercut.config import HealOptions, SearchOptions
from layercut.evaluate import throughput
from layercut.forward import hard_kl
from layercut.gate import count_cuts, exact_scorer, exhaustive, parse_key, search_exhaustive, search_gate
from layercut.heal import HealData, teacher_targets
from layercut.layers import Handle, cut
from layercut.record import library_versions

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                  "rope_theta": 500000.0},
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0},
    # a smoke-test shape that runs on the CPU in seconds
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512},
}


def gib(count: float) -> float:
    return count / 2**30


def place(index) -> torch.device:
    """A device-map value as a device (the CPU when no GPU is present: the smoke test)."""
    return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")


def build(shape: str, gpus: int, max_memory_gib: float):
    """A random-init bf16 model of ``shape``: on GPU 0, or spread over ``gpus`` GPUs by accelerate."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    torch.set_default_dtype(default)
    if gpus == 1:
        device_map = {"": 0}
    else:
        device_map = infer_auto_device_map(model, max_memory={g: f"{max_memory_gib}GiB" for g in range(gpus)},
                                           no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
    generator = {}
    for name, parameter in model.named_parameters():
        owner = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), key=len)
        device = place(device_map[owner])
        generator.setdefault(device, torch.Generator(device).manual_seed(len(generator)))
        value = torch.empty(parameter.shape, dtype=torch.bfloat16, device=device)
        value.normal_(0, 0.02, generator=generator[device]) if value.ndim > 1 else value.fill_(1.0)
        set_module_tensor_to_device(model, name, device, value=value)
    model = model.to(place(0)) if gpus == 1 else dispatch_model(model, device_map)
    return model.eval(), device_map


def peaks(gpus: int) -> list[int]:
    if not torch.cuda.is_available():
        return [0] * gpus
    for g in range(gpus):
        torch.cuda.synchronize(g)
    return [torch.cuda.max_memory_allocated(g) for g in range(gpus)]


def reset_peaks(gpus: int) -> None:
    for g in range(gpus if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(g)
        torch.cuda.reset_peak_memory_stats(g)


def speed_batches(arguments) -> list[int]:
    """The batch sizes of ``--speed-batches`` (empty: no speed measurement)."""
    return [int(batch) for batch in arguments.speed_batches.split(",") if batch.strip()]


def speeds(models: dict, rounds: int, batch_size: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """Median prefill/decode tokens per second of each model over ``rounds`` rounds, the models interleaved."""
    seen: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seen[name].append(throughput(model, batch_size, 256, new_tokens, repeats=1))
    return {name: {kind: statistics.median(r[f"{kind}_tokens_per_s"] for r in runs) for kind in ("prefill", "decode")}
            for name, runs in seen.items()}


def search_costs(handle, windows: torch.Tensor, remove: int, arguments, measures: dict, gpus: int) -> None:
    """The exact single-segment oracle by the plain gated path and by the shared scorer, the default gate, the
    gate's read-out scored both ways, and the cost of enumerating every cut of at most two segments, estimated
    from the shared scorer's cost per cut."""
    def timed(function, *args, **kwargs):
        for g in range(gpus if torch.cuda.is_available() else 0):
            torch.cuda.synchronize(g)
        started = time.perf_counter()
        value = function(*args, **kwargs)
        for g in range(gpus if torch.cuda.is_available() else 0):
            torch.cuda.synchronize(g)
        return value, time.perf_counter() - started

    batch = arguments.search_batch
    options = SearchOptions(method="exhaustive", remove=remove, gate_checkpointing=arguments.checkpointing)
    exact_scorer(handle, windows[:2], options, batch)([((0, remove),)])  # warm-up: CUDA context and kernels untimed
    if arguments.plain:
        plain, plain_s = timed(exhaustive, lambda c: hard_kl(handle, windows, c, batch), handle.num_layers, remove)
        measures.update({"exact one segment, plain gated path: seconds": plain_s})
    reset_peaks(gpus)
    shared, shared_s = timed(search_exhaustive, handle, windows, remove, options, batch)
    measures.update({"exact one segment: cuts": shared.evaluations,
                     "exact one segment, shared scorer: seconds": shared_s,
                     "exact one segment, shared scorer: peak GiB per GPU": " / ".join(f"{gib(b):.1f}"
                                                                                     for b in peaks(gpus))})
    if arguments.plain:
        measures.update({"exact one segment: speed-up": plain_s / shared_s,
                         "exact one segment: same cut": plain.segments == shared.segments})
    scorer, dense_s = timed(exact_scorer, handle, windows, options, batch)
    per_cut = (shared_s - dense_s) / shared.evaluations
    two = count_cuts(handle.num_layers, remove, 2)
    measures.update({"shared scorer: dense pass seconds": dense_s, "shared scorer: seconds per cut": per_cut,
                     "exact at most two segments: cuts": two,
                     "exact at most two segments: seconds (estimated)": dense_s + per_cut * two})
    configs = json.loads(arguments.gate_configs) if arguments.gate_configs else {"default": json.loads(
        arguments.gate_options or "{}")}
    # warm-up, untimed: the first gate run pays one-time costs (its backward's kernels) that no setting should carry
    search_gate(handle, windows[:2], remove, SearchOptions(remove=remove, gate_steps=2,
                                                           gate_checkpointing=arguments.checkpointing), batch)
    for name, config in configs.items():
        reset_peaks(gpus)
        gate = SearchOptions(remove=remove, gate_checkpointing=arguments.checkpointing, **config)
        found, gate_s = timed(search_gate, handle, windows, remove, gate, batch)
        measures[f"{name} gate options"] = json.dumps(gate.model_dump(exclude_unset=True))
        measures.update({f"{name} gate: seconds": gate_s, f"{name} gate: steps": len(found.trajectory),
                         f"{name} gate: profiles per step": str([len(t["active"]) for t in found.trajectory]),
                         f"{name} gate: cuts scored exactly": found.evaluations,
                         f"{name} gate: peak GiB per GPU": " / ".join(f"{gib(b):.1f}" for b in peaks(gpus)),
                         f"{name} gate / exact oracle (shared)": gate_s / shared_s,
                         f"{name} gate: same cut as the oracle": found.segments == shared.segments})
        scored = [parse_key(key) for key in found.landscape]
        _, shared_readout = timed(scorer, scored)
        measures[f"{name} gate: its read-out's cuts scored again, shared (dense pass done), seconds"] = shared_readout
        if arguments.plain:
            _, plain_readout = timed(hard_kl, handle, windows, scored, batch)
            measures[f"{name} gate: its read-out's cuts scored again, plain path, seconds"] = plain_readout


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--max-memory-gib", type=float, default=100.0, help="weights per GPU for the device map")
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of layers to remove")
    parser.add_argument("--steps", type=int, default=60, help="gate steps (layercut's default: 60)")
    parser.add_argument("--profiles", type=int, default=0, help="gate profiles (0: layercut's default)")
    parser.add_argument("--step-windows", type=int, default=4, help="windows per gate step (default 4)")
    parser.add_argument("--plain-steps", type=int, default=4, help="gate steps without checkpointing (0: skip)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--heal-steps", type=int, default=10)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--speed-batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="rebuild the (identical) dense model beside the pruned one so that dense and pruned "
                             "speed rounds alternate (needs room for both)")
    parser.add_argument("--static-cache", action="store_true",
                        help="also measure speed with a static KV cache, which transformers decodes with a compiled "
                             "forward (CUDA graphs)")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--search-only", action="store_true",
                        help="measure only the search: exact oracle (plain and shared), default gate, read-out")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="--search-only: also time the plain gated oracle path")
    parser.add_argument("--search-batch", type=int, default=16, help="windows per pass in --search-only")
    parser.add_argument("--gate-options", default="", help="--search-only: JSON of gate options over the defaults")
    parser.add_argument("--gate-configs", default="", help="--search-only: JSON object of named gate options, each "
                        "run in turn (instead of --gate-options)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="--search-only: per-layer checkpointing in the gate")
    arguments = parser.parse_args()
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = arguments.gpus
    started = time.perf_counter()
    model, device_map = build(arguments.shape, gpus, arguments.max_memory_gib)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_gpu = [sum(p.numel() * p.element_size() for p in model.parameters() if p.device == place(g))
               for g in range(gpus)]
    layers = model.config.num_hidden_layers
    remove = round(arguments.ratio * layers)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"shape": arguments.shape, "device": f"{gpus} x {name}",
              "command": "python " + " ".join(sys.argv), "settings": vars(arguments), "versions": library_versions(),
              "device_map_gpus": sorted(set(device_map.values())),
              "measures": {"build seconds": time.perf_counter() - started, "layers": layers, "removed": remove,
                           "weights GiB (bf16)": gib(weights),
                           "weights GiB per GPU": " / ".join(f"{gib(b):.1f}" for b in per_gpu)}}
    measures = result["measures"]
    write(result, out)
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPES[arguments.shape]["vocab_size"]
    windows = torch.randint(0, vocab, (arguments.calib_windows, arguments.seq_len), generator=generator)

    if arguments.search_only:
        search_costs(Handle.of(model), windows, remove, arguments, measures, gpus)
        write(result, out)
        print((out / "big_model.md").read_text())
        return

    dense_speed = {}
    if not arguments.interleave:
        for batch in speed_batches(arguments):
            dense_speed[batch] = speeds({"dense": model}, arguments.speed_rounds, batch, arguments.new_tokens)["dense"]

    handle = Handle.of(model)
    gate = SearchOptions(method="clp", remove=remove, gate_profiles=arguments.profiles, gate_steps=arguments.steps,
                         gate_windows=arguments.step_windows, gate_checkpointing=True)
    if arguments.plain_steps:
        reset_peaks(gpus)
        plain_options = gate.replace(gate_steps=arguments.plain_steps, gate_checkpointing=False)
        plain = selection.search(handle, windows, plain_options, batch_size=4)
        peak = peaks(gpus)
        measures.update({"no checkpointing: gate steps": arguments.plain_steps,
                         "no checkpointing: gate seconds (with read-out)": plain.seconds,
                         "no checkpointing: peak GiB per GPU": " / ".join(f"{gib(b):.1f}" for b in peak),
                         "no checkpointing: peak / weights (worst GPU)": max(p / w for p, w in zip(peak, per_gpu))})
        write(result, out)

    reset_peaks(gpus)
    step_times = []
    last = [time.perf_counter()]

    def tick(_units):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    found = selection.search(handle, windows, gate, batch_size=4, progress=tick)
    peak = peaks(gpus)
    profiles = len(found.trajectory[0]["starts"])
    measures.update({
        "gate: profiles x windows per step": f"{profiles} x {arguments.step_windows}",
        "gate: steps": arguments.steps,
        "gate: seconds per step (median)": statistics.median(step_times[1:] or step_times),
        "gate: training seconds": sum(step_times),
        "gate: total seconds (with exact read-out)": found.seconds,
        "gate: cuts scored exactly": found.evaluations,
        "gate: peak GiB per GPU": " / ".join(f"{gib(b):.1f}" for b in peak),
        "gate: peak / weights (worst GPU)": max(p / w for p, w in zip(peak, per_gpu)),
        "gate: segments": str(found.segments),
    })
    write(result, out)
    if arguments.oracle:
        oracle = selection.search(handle, windows, gate.replace(method="exhaustive"), batch_size=4)
        measures.update({"exhaustive: seconds": oracle.seconds, "exhaustive: cuts scored": oracle.evaluations})
        write(result, out)

    heal_windows = windows[: max(8, arguments.calib_windows // 2)]
    prepared = HealData(heal_windows, teacher_targets(model, heal_windows, 64, 4)) if arguments.heal_steps else None
    start = time.perf_counter()
    removed = cut(handle, found.segments)
    measures["cut seconds"] = time.perf_counter() - start
    write(result, out)

    if arguments.heal_steps:
        reset_peaks(gpus)
        report = heal.heal(handle, removed, prepared,
                           HealOptions(heal="endpoints", heal_steps=arguments.heal_steps, heal_batch=4))
        peak = peaks(gpus)
        measures.update({"repair: trained parameters": report.trainable_parameters,
                         "repair: seconds per step": report.seconds / arguments.heal_steps,
                         "repair: peak GiB per GPU": " / ".join(f"{gib(b):.1f}" for b in peak)})
        write(result, out)

    measures["limit L/(L-n)"] = layers / (layers - remove)
    dense = build(arguments.shape, gpus, arguments.max_memory_gib)[0] if arguments.interleave and speed_batches(arguments) \
        else None
    for mode in ("dynamic", "static") if arguments.static_cache else ("dynamic",):
        label = "" if mode == "dynamic" else "static cache, "
        for each in (dense, model):
            if each is not None:
                each.generation_config.cache_implementation = None if mode == "dynamic" else "static"
        for batch in speed_batches(arguments):
            if dense is not None:
                both = speeds({"dense": dense, "pruned": model}, arguments.speed_rounds, batch, arguments.new_tokens)
            elif mode == "dynamic":
                both = {"dense": dense_speed[batch],
                        **speeds({"pruned": model}, arguments.speed_rounds, batch, arguments.new_tokens)}
            else:
                continue
            for kind in ("prefill", "decode"):
                ratio = both["pruned"][kind] / both["dense"][kind]
                measures[f"{label}batch {batch} {kind} tokens/s dense -> pruned"] = \
                    f"{both['dense'][kind]:.1f} -> {both['pruned'][kind]:.1f}"
                measures[f"{label}batch {batch} {kind} ratio (of the limit)"] = \
                    f"{ratio:.3f} ({ratio / measures['limit L/(L-n)']:.3f})"
            write(result, out)
    del dense

    if arguments.save:
        folder = Path(tempfile.mkdtemp(prefix="layercut-save-"))
        if shutil.disk_usage(folder).free > 1.3 * weights * (layers - remove) / layers:
            start = time.perf_counter()
            model.save_pretrained(folder)
            measures["save_pretrained seconds (pruned)"] = time.perf_counter() - start
        else:
            measures["save_pretrained seconds (pruned)"] = "skipped: not enough free disk"
        shutil.rmtree(folder, ignore_errors=True)
        write(result, out)
    print((out / "big_model.md").read_text())


if __name__ == "__main__":
    main()

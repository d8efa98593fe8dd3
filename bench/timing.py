"""Cold-process and warm timings of ``layercut search --remove n``: the default method against ``--method exhaustive``.

* COLD: a fresh process per run (``python -m layercut search FOLDER --remove n --json``), timed from launch to exit
  (imports, load, calibration, warm-up and all). The search stage's own seconds in that fresh process (the
  ``seconds`` of its JSON; it includes everything the first search in a process pays) are reported beside it.
* WARM: in this process, the same parsed command line, the model loaded and calibrated once, one untimed search,
  then the search call alone (``selection.search``), the GPU's queue drained before and after.

The models are random-init from the configs below (SHAPES: structure only, no weights), built once with
``from_config`` in the dtype the CLI loads them in (bfloat16 on a GPU, float32 on the CPU) and saved with a
tokenizer whose ids fit the vocabulary into ``--models``. The tokenizers are kept in ``--models``/tokenizers after
their first use: a machine without the built-in models' assets needs that folder (carry it) and the layercut
cache's calibration corpus (``LAYERCUT_CACHE``). Random weights make the chosen cut meaningless; only
cost is measured. Writes ``timing.json`` and ``README.md`` (the tables) into ``--out`` after every shape, with the command.

    # CPU, the small shapes (1 repeat when a cold run costs minutes)
    python bench/timing.py --shapes smollm2-135m,gemma3-270m --out bench/results/timing-cpu
    # one GPU: the three shapes that fit, 3 repeats
    python bench/timing.py --shapes smollm2-135m,gemma3-270m,llama3-8b --out bench/results/timing-h200
    # one GPU: what the first search in a process pays that the second does not (torch.profiler tables, 8B shape)
    python bench/timing.py --shapes llama3-8b --profile --out bench/results/timing-h200-profile
    # two GPUs, where lent: the 70B shape (issue 30)
    python bench/timing.py --shapes llama3-70b --out bench/results/timing-2xh200

``--profile`` writes, per method, ``profile-<shape>-<method>.txt``: the first and the second search of one
process, each with the end of every gate step and torch.profiler's operator table by host and by device time.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layercut import cli, config, selection
from layercut.data import calibrate
from layercut.load import alias_checkpoint, load_model
from layercut.record import library_versions


@dataclass(frozen=True)
class Shape:
    """A model shape: its config (no weights), the layers to remove, the alias whose tokenizer fits its vocabulary,
    and CLI flags it needs."""

    config: dict
    remove: int
    tokenizer: str
    flags: tuple[str, ...] = field(default_factory=tuple)


LLAMA3 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
GEMMA3_LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 3
SHAPES = {
    "smollm2-135m": Shape({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                           "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                           "bos_token_id": 1, "eos_token_id": 2}, 6, "smollm2-135m"),
    "gemma3-270m": Shape({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 640,
                          "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                          "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                          "vocab_size": 262144, "max_position_embeddings": 32768, "sliding_window": 512,
                          "layer_types": GEMMA3_LAYER_TYPES, "hidden_activation": "gelu_pytorch_tanh",
                          "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
                          "pad_token_id": 0,
                          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
                         4, "gemma3-270m"),
    # Llama-3's own tokenizer is not offline; SmolLM2's ids (< 49152) fit its vocabulary
    "llama3-8b": Shape({**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32}, 8, "smollm2-135m"),
    "llama3-70b": Shape({**LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                         "num_attention_heads": 64}, 16, "smollm2-135m", ("--device-map", "auto")),
    # a smoke-test shape that runs on the CPU in seconds
    "tiny": Shape({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "vocab_size": 49152, "max_position_embeddings": 512, "tie_word_embeddings": True}, 2,
                  "smollm2-135m"),
}
METHODS = ("clp", "exhaustive")  # clp is the default method


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    """``cpu``, or the GPU's model in lower case (``h200``), with ``2x`` in front for two GPUs."""
    if not torch.cuda.is_available():
        return "cpu"
    words = torch.cuda.get_device_name(0).split()  # "NVIDIA H100 80GB HBM3": the word that names the chip
    name = next((w for w in words if re.fullmatch(r"[A-Z]+\d{2,4}[A-Z]*", w)), words[-1]).lower()
    count = torch.cuda.device_count()
    return f"{count}x{name}" if count > 1 else name


def tokenizer(alias: str, root: Path):
    """The tokenizer of the built-in model ``alias``, kept in ``root``/``alias`` (a few MB, which a machine without
    the model's assets can be given) after the first time."""
    from transformers import AutoTokenizer

    if not (root / alias / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(alias_checkpoint(alias)).save_pretrained(root / alias)
    return AutoTokenizer.from_pretrained(root / alias)


def build_folder(name: str, root: Path) -> Path:
    """The random-init model of shape ``name`` in the CLI's dtype here, with a tokenizer, saved once under ``root``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    folder = root / f"{name}-{str(dtype).removeprefix('torch.')}"
    if (folder / "config.json").is_file():
        return folder
    shape = SHAPES[name]
    model_config = AutoConfig.for_model(**shape.config)
    torch.manual_seed(0)
    # built on the GPU when there is one (fast random init), else on the CPU; saved as it is
    with torch.device("cuda" if torch.cuda.is_available() and "--device-map" not in shape.flags else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    del model
    tokenizer(shape.tokenizer, root / "tokenizers").save_pretrained(staging)
    staging.rename(folder)
    return folder


def command(name: str, folder: Path, method: str, extra: list[str]) -> list[str]:
    """The ``layercut search`` arguments timed for shape ``name`` (after ``python -m layercut``)."""
    return ["search", str(folder), "--remove", str(SHAPES[name].remove), "--method", method, "--json",
            *SHAPES[name].flags, *extra]


def fresh_process(arguments: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """``python -m layercut ARGUMENTS`` in a fresh process: its seconds from launch to exit and what it printed;
    SystemExit with its error output when it fails."""
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-m", "layercut", *arguments], capture_output=True, text=True,
                              check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"layercut {shlex.join(arguments)} failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return wall, finished


def cold_run(arguments: list[str]) -> dict:
    """One fresh process: seconds from launch to exit, its CPU seconds (every thread, user and system), and the
    search stage's seconds it reported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, finished = fresh_process(arguments)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = json.loads(finished.stdout.strip().splitlines()[-1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "search_s": found["seconds"], "segments": found["segments"],
            "kl": found["kl"]}


def prepared(arguments: list[str]):
    """``(handle, calibration windows, recipe)`` exactly as ``layercut search`` prepares them from ``arguments``."""
    parsed = cli.build_parser().parse_args(arguments)
    recipe = config.recipe_from_arguments(parsed, parsed.recipe)
    handle = load_model(parsed.model, recipe.model)
    return handle, calibrate(handle.tokenizer, recipe.data, test=False).calibration, recipe


def search_once(handle, windows, recipe, progress=None) -> tuple[selection.SearchResult, float, float]:
    """The search call the CLI makes, its seconds with the GPU's queue drained before and after, and the CPU
    seconds this process spent in it (every thread)."""
    synchronize()
    started, cpu = time.perf_counter(), time.process_time()
    found = selection.search(handle, windows, recipe.search, recipe.data.batch_size, recipe.data.seed, progress)
    synchronize()
    return found, time.perf_counter() - started, time.process_time() - cpu


def warm_runs(arguments: list[str], repeats: int) -> dict:
    """The search call alone, ``repeats`` times after one untimed warm-up search, in this process."""
    handle, windows, recipe = prepared(arguments)
    _, warm_up, _ = search_once(handle, windows, recipe)
    seconds, cpu, found = [], [], None
    for _ in range(repeats):
        found, elapsed, spent = search_once(handle, windows, recipe)
        seconds.append(elapsed)
        cpu.append(spent)
    return {"warm_up_s": warm_up, "search_s": seconds, "cpu_s": cpu, "segments": [list(s) for s in found.segments],
            "kl": found.kl}


def spread(values: list[float]) -> dict:
    """Mean, half the range (the spread quoted as ±) and the values."""
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "values": values}


def step_clock():
    """``(ends, progress)``: a gate ``progress`` callback that appends to ``ends`` the seconds since it was made at
    the end of each gate step (the first includes the search's setup: the dense pass of the exact scorer)."""
    ends, started = [], time.perf_counter()

    def progress(_) -> None:
        synchronize()
        ends.append(round(time.perf_counter() - started, 4))

    return ends, progress


def profile_first_and_second(arguments: list[str], path: Path) -> None:
    """torch.profiler tables and step ends of the first and the second search of one process, into ``path``."""
    from torch.profiler import ProfilerActivity, profile

    handle, windows, recipe = prepared(arguments)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    parts = [f"layercut {shlex.join(arguments)}  ({device_name()}, {library_versions()})"]
    for which in ("first", "second"):
        ends, step_end = step_clock()
        with profile(activities=activities) as profiled:
            _, seconds, _ = search_once(handle, windows, recipe, step_end)
        averages = profiled.key_averages()
        parts += [f"\n===== {which} search: {seconds:.3f} s; gate step ends (s): {ends}",
                  averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
                  averages.table(sort_by=device_key, row_limit=20, max_name_column_width=60)]
    path.write_text("\n".join(parts) + "\n")


COLUMNS = {"cold_wall": "cold, launch to exit (s)", "cold_cpu": "cold, CPU (s)", "cold_search": "cold, search stage (s)",
           "warm_search": "warm, search (s)", "warm_cpu": "warm, search CPU (s)"}


def table(results: dict) -> str:
    """The markdown tables of ``results["shapes"]``: each method's times, then the gate's over the oracle's."""
    shapes = results["shapes"].values()
    kinds = [kind for kind in COLUMNS if all(kind in row for shape in shapes for row in shape["methods"].values())]
    lines = ["| shape | n | method | " + " | ".join(COLUMNS[kind] for kind in kinds) + " | cut |",
             "|---|---|---|" + "---|" * (len(kinds) + 1)]
    ratio_lines = ["", "| shape | " + " | ".join(f"gate/oracle {COLUMNS[kind]}" for kind in kinds) + " |",
                   "|---|" + "---|" * len(kinds)]
    for name, shape in results["shapes"].items():
        for method, row in shape["methods"].items():
            cells = [f"{row[kind]['mean']:.2f} ± {row[kind]['spread']:.2f}" for kind in kinds]
            lines.append(f"| {name} | {shape['remove']} | {method} | {' | '.join(cells)} | {row['segments']} |")
        if all(method in shape["methods"] for method in METHODS):
            gate, oracle = (shape["methods"][method] for method in METHODS)
            ratios = [gate[kind]["mean"] / oracle[kind]["mean"] for kind in kinds]
            ratio_lines.append(f"| {name} | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    return "\n".join(lines + ratio_lines)


def write(results: dict, out: Path) -> None:
    (out / "timing.json").write_text(json.dumps(results, indent=1) + "\n")
    repeats = results["repeats"]
    (out / "README.md").write_text(
        f"# `layercut search` timings on {results['device']}\n\n```sh\n{results['command']}\n```\n\n"
        f"Cold: a fresh process per run, {repeats} run(s), timed from launch to exit; its search stage is the "
        f"`seconds` the command reported (the first search of that process). Warm: {repeats} search call(s) in one "
        "process after one untimed warm-up search. CPU: user and system seconds of every thread (on a shared "
        "machine wall time also counts the waiting). Mean ± half the range. Random-init weights: the cut is "
        f"meaningless, only cost is measured.\n\n{table(results)}\n\nVersions: {results['versions']}\n")


def measure(name: str, folder: Path, extra: list[str], repeats: int) -> dict:
    """Cold and warm timings of both methods on shape ``name``."""
    rows = {}
    for method in METHODS:
        arguments = command(name, folder, method, extra)
        cold = [cold_run(arguments) for _ in range(repeats)]
        warm = warm_runs(arguments, repeats)
        rows[method] = {"command": "layercut " + shlex.join(arguments),
                        "cold_wall": spread([c["wall_s"] for c in cold]), "cold_cpu": spread([c["cpu_s"] for c in cold]),
                        "cold_search": spread([c["search_s"] for c in cold]), "warm_search": spread(warm["search_s"]),
                        "warm_cpu": spread(warm["cpu_s"]),
                        "warm_up_s": warm["warm_up_s"], "segments": warm["segments"], "kl": warm["kl"],
                        "cold_segments": [c["segments"] for c in cold]}
        print(name, method, json.dumps({k: v for k, v in rows[method].items() if k != "command"}), flush=True)
    return {"remove": SHAPES[name].remove, "config": SHAPES[name].config, "methods": rows}


def shape_parser(doc: str, shapes: str, command: str) -> argparse.ArgumentParser:
    """The options of a benchmark that times ``layercut COMMAND`` on the model shapes of :data:`SHAPES`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--shapes", default=shapes, help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="runs/timing-models", help="folder the built models are saved in")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", default="", help=f"more `layercut {command}` flags, e.g. '--calib-windows 16'")
    return parser


def main() -> None:
    parser = shape_parser(__doc__, "smollm2-135m,gemma3-270m", "search")
    parser.add_argument("--profile", action="store_true", help="profile the first and second search instead")
    arguments = parser.parse_args()
    out, extra = Path(arguments.out), shlex.split(arguments.extra)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": device_name(), "command": "python " + shlex.join(sys.argv), "repeats": arguments.repeats,
               "versions": library_versions(), "shapes": {}}
    for name in arguments.shapes.split(","):
        folder = build_folder(name, Path(arguments.models))
        if arguments.profile:
            for method in METHODS:
                profile_first_and_second(command(name, folder, method, extra), out / f"profile-{name}-{method}.txt")
            continue
        results["shapes"][name] = measure(name, folder, extra, arguments.repeats)
        write(results, out)


if __name__ == "__main__":
    main()

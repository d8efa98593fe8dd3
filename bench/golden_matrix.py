"""The golden run under every CPU kernel and thread count this machine has, against the recorded golden values.

Each setting runs in a fresh process (ATEN_CPU_CAPABILITY is read when torch loads): default, avx2 and avx512 where
the CPU has it, each with 1 and 2 threads. Writes, per setting, the deviation of each group of recorded numbers
from tests/golden/prune_demo.json in the units of tests/golden_run.py's `deviations`, and whether it passes the
test's tolerance; plus the same deviations for perturbed runs that the golden test must catch.

    .venv/bin/python bench/golden_matrix.py --out bench/results/golden-matrix
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

CHILD = """
import json, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import golden_run
from conftest import make_tiny_tokenizer
torch.set_num_threads({threads})
tokenizer = make_tiny_tokenizer()
with tempfile.TemporaryDirectory() as folder:
    found = golden_run.run(Path(folder), tokenizer)
found["capability"] = torch.backends.cpu.get_cpu_capability()
found["threads"] = torch.get_num_threads()
print(json.dumps(found))
"""


def capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = ["default"]
    if " avx2" in flags:
        found.append("avx2")
    if " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags and " avx512dq" in flags:
        found.append("avx512")
    return found


def run_setting(capability: str, threads: int) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(TESTS), threads=threads)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"setting {capability}/{threads} failed:\n{done.stderr[-4000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found["seconds"] = round(time.perf_counter() - started, 1)
    return found


def row(capability: str, threads: int, expected: dict, cache: Path) -> dict:
    """One setting's row, cached in ``cache`` so that a rerun measures only the settings not yet done."""
    import golden_run

    path = cache / f"{capability}-{threads}.json"
    if path.exists():
        result = json.loads(path.read_text())
    else:
        found = run_setting(capability, threads)
        groups = tuple(f"{group} " for group in golden_run.TOLERANCE)
        result = {"requested": capability, "capability": found["capability"], "threads": found["threads"],
                  "seconds": found["seconds"], "deviations": golden_run.deviations(found, expected),
                  "exact_mismatches": [m for m in golden_run.mismatches(found, expected) if not m.startswith(groups)]}
        path.write_text(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    # judged against the test's tolerance as it is now (the deviations do not depend on it)
    result["mismatches"] = result["exact_mismatches"] + [
        f"{group} {value:.3g} > {golden_run.TOLERANCE[group]:.3g}" for group, value in result["deviations"].items()
        if not value <= golden_run.TOLERANCE[group]]
    return result


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--jobs", type=int, default=1, help="settings run side by side (each in its own process)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import golden_run

    expected = golden_run.expected()
    cache = args.out / "settings"
    cache.mkdir(parents=True, exist_ok=True)
    settings = [(c, int(t)) for c in capabilities() for t in args.threads.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda setting: row(*setting, expected, cache), settings))
    result = {"command": f"bench/golden_matrix.py --out {args.out}", "cpu": cpu_name(),
              "tolerance": golden_run.TOLERANCE, "rows": rows,
              "largest": {g: max(r["deviations"][g] for r in rows) for g in golden_run.TOLERANCE}}
    (args.out / "matrix.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| requested | torch runs | threads | kl | perplexity | loss | weights | passes | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["deviations"]
        lines.append(f"| {r['requested']} | {r['capability']} | {r['threads']} | {d['kl']:.2e} | {d['perplexity']:.2e} "
                     f"| {d['loss']:.2e} | {d['weights']:.2e} | {'yes' if not r['mismatches'] else r['mismatches']} "
                     f"| {r['seconds']} |")
    (args.out / "matrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())

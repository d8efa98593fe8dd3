"""`layercut prune` with a training-free heal, timed as a user meets it: a fresh process from launch to exit, once per
source tree given (e.g. a worktree of an earlier commit, then this one), one after the other on an idle machine.
Writes, per tree, the wall seconds, the peak memory of the process and what the run reported (segments, perplexity
before and after, the heal's own seconds), so that equal outputs can be checked beside the times. Run from the
repository root:

    git worktree add /tmp/before b073256
    python bench/results/heal-teacher-cpu/measure.py bench/results/heal-teacher-cpu/results.json /tmp/before .
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/results/patches-cpu's command: CLP's SmolLM2 cut at n = 6, the grid's heal windows and test windows
COMMAND = ["prune", "smollm2-135m", "--segment", "13:19", "--heal", "lsq", "--heal-windows", "1024", "--ppl-windows",
           "256", "--dtype", "float32", "--no-eval", "--no-speed"]


def run(tree: Path) -> dict:
    """One cold `layercut prune` from the sources of ``tree``."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "pruned"
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "layercut", *COMMAND, "--output", str(output)], env=env,
                                   stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"layercut failed in {tree}")
        record = json.loads((output / "layercut.json").read_text())
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    return {"tree": str(tree), "commit": commit, "seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "segments": record["segments"], "metrics": record["metrics"], "heal": record.get("heal")}


def main() -> None:
    out, trees = Path(sys.argv[1]), [Path(t).resolve() for t in sys.argv[2:]]
    results = {"command": "layercut " + " ".join(COMMAND) + " --output DIR", "runs": []}
    for tree in trees:
        results["runs"].append(run(tree))
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: results["runs"][-1][k] for k in ("commit", "seconds", "peak_rss_gib", "segments")}))


if __name__ == "__main__":
    main()

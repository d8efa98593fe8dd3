"""The exact KL the repair selection chooses among (repair.scored_cuts): SmolLM2-135M, 10 of 30, two segments, 32
calibration windows of 128 tokens, timed in this process. Prints the seconds and counts; writes every cut's KL to the
file named first. Run from the repository root:

    python bench/results/repair-scored-cuts-cpu/measure.py /tmp/kl.json
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

from layercut import repair

_spec = importlib.util.spec_from_file_location("timing", "bench/timing.py")
timing = sys.modules.setdefault("timing", importlib.util.module_from_spec(_spec))  # its dataclasses look it up
_spec.loader.exec_module(timing)


def main() -> None:
    handle, windows, recipe = timing.prepared(["search", "smollm2-135m", "--remove", "10", "--method", "repair",
                                               "--segments", "2", "--calib-windows", "32", "--seq-len", "128"])
    started = time.perf_counter()
    kl, count = repair.scored_cuts(handle, windows, 10, recipe.search, recipe.data.batch_size, recipe.data.seed)
    print(json.dumps({"seconds": time.perf_counter() - started, "count": count, "cuts": len(kl)}))
    Path(sys.argv[1]).write_text(json.dumps({repair.candidate_key(c): v for c, v in sorted(kl.items())}))


if __name__ == "__main__":
    main()

"""The lsq patch against no repair on CLP's cut (SmolLM2, 10 of 30, seed 0), paired on every measure the grid's report
pairs (bench/grid.py's SEPARATING). Run from the repository root: python bench/results/grid-heals-cpu/lsq_vs_none.py"""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("grid", "bench/grid.py")
grid = sys.modules.setdefault("grid", importlib.util.module_from_spec(spec))
spec.loader.exec_module(grid)

cells, _, _ = grid.read_cells(Path(__file__).parent)
table = grid.summaries(cells)
lsq, none = (table[("smollm2-135m", 10, "clp", heal)] for heal in ("lsq", "none"))
print("wiki perplexity", grid.perplexity_verdict(lsq, none), "| lee", grid.perplexity_verdict(lsq, none, "lee"))
for measure, difference_of in grid.SEPARATING.items():
    found = difference_of(lsq, none)
    if found is not None:
        print(f"{measure}: {found.verdict(grid.higher_is_better(measure, none['cells'][0]))} "
              f"{found.estimate:+.4f} [{found.low:+.4f}, {found.high:+.4f}]")

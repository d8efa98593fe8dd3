"""Spearman correlation of each proxy in this folder's search with the landscape's 200-step wiki perplexity (the
landscape's cuts read by bench/landscape.py), then README.md's table of every cut, by its patched KL."""

import importlib.util
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from layercut.gate import candidate_key

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
_spec = importlib.util.spec_from_file_location("landscape", ROOT / "bench" / "landscape.py")
landscape = sys.modules.setdefault("landscape", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(landscape)

cuts = landscape.read_cuts(ROOT / "bench" / "results" / "landscape-h100")
for path in sorted(HERE.glob("*.json")):
    search = json.loads(path.read_text())
    cells = {candidate_key(tuple(map(tuple, cell["cut"]))): cell
             for cell in cuts[search["model"], search["remove"], search["seed"]] if cell["segments"] == 1}
    rows = [(row["kl"], row["screened_kl"], landscape.proxies(cells[row["cut"]], 200)["calib KL after 10 steps"],
             landscape.repaired(cells[row["cut"]], 200), row["cut"]) for row in search["candidates"]]
    for name, i in (("exact KL", 0), ("lsq-patched held-out KL", 1), ("landscape's 10-step heal KL", 2)):
        rho = spearmanr([row[i] for row in rows], [row[3] for row in rows]).statistic
        print(f"{path.stem}: {name}: Spearman {rho:.2f} over {len(rows)} cuts")
    print("| cut | exact KL (128 windows) | lsq-patched held-out KL | landscape: KL after 10 heal steps | landscape: "
          "wiki ppl after 200 |\n|---|---|---|---|---|")
    for kl, patched, healed, repaired, cut in sorted(rows, key=lambda row: row[1]):
        print(f"| [{cut.replace(':', ', ')}) | {kl:.4f} | {patched:.4f} | {healed:.4f} | {repaired:.2f} |")

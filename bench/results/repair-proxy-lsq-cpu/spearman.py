"""Spearman correlation of each proxy in this folder's search with the landscape's 200-step wiki perplexity."""

import json
from pathlib import Path

from scipy.stats import spearmanr

RESULTS = Path(__file__).parent.parent
for path in sorted(Path(__file__).parent.glob("*.json")):
    search = json.loads(path.read_text())
    steps = {}
    for cut in (RESULTS / "landscape-h100" / "cuts").glob(
            f"{search['model']}-n{search['remove']}-seed{search['seed']}-*.json"):
        cell = json.loads(cut.read_text())
        if cell["segments"] == 1:
            steps[" ".join(f"{a}:{b}" for a, b in cell["cut"])] = cell["heal"]["steps"]
    rows = [(row["kl"], row["screened_kl"], steps[row["cut"]]["10"]["proxy_kl"],
             steps[row["cut"]]["200"]["perplexity_wiki"]) for row in search["candidates"]]
    for name, i in (("exact KL", 0), ("lsq-patched held-out KL", 1), ("landscape's 10-step heal KL", 2)):
        rho = spearmanr([row[i] for row in rows], [row[3] for row in rows]).statistic
        print(f"{path.stem}: {name}: Spearman {rho:.2f} over {len(rows)} cuts")

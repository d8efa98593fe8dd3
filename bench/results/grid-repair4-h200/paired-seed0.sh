#!/usr/bin/env bash
# The repair selection's seed-0 cells here, compared item by item and window by window with CLP's seed-0 cells of
# bench/results/grid-paired-h100 (same protocol, same 256 wiki and 256 lee test windows, same 200 generation
# prompts, same first 500 LAMBADA items; those cells also scored seven other tasks, dropped here so that both sides
# hold the same task). Writes paired-seed0.md beside this script. Run from the repository root.
set -euo pipefail
here=bench/results/grid-repair4-h200 work=$(mktemp -d)
mkdir -p "$work/cells" && cp "$here/protocol.json" "$work/"
python - "$work" <<'PY'
import json, sys
from pathlib import Path
for path in Path("bench/results/grid-paired-h100/cells").glob("*.json"):
    if path.name.endswith(("-clp-endpoints.json", "-dense.json")):
        cell = json.loads(path.read_text())
        lambada = cell["zero_shot"]["tasks"]["lambada_openai"]
        cell["zero_shot"] |= {"tasks": {"lambada_openai": lambada}, "average_tasks": ["lambada_openai"],
                              "average": {"acc": lambada["acc"], "acc_norm": lambada["acc"]}}
        (Path(sys.argv[1]) / "cells" / path.name).write_text(json.dumps(cell))
PY
cp "$here"/cells/*-seed0-repair-endpoints.json "$work/cells/"
python bench/grid.py --out "$work" --report > /dev/null
cp "$work/results.md" "$here/paired-seed0.md" && rm -r "$work"

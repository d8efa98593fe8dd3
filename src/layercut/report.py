"""Compare exported pruned checkpoints: a markdown table from their ``layercut.json`` files and a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from layercut.errors import LayercutError


def read_records(folders: list[str | Path]) -> list[tuple[str, dict]]:
    """``(folder name, layercut.json)`` for each folder; LayercutError for a folder layercut did not write."""
    records = []
    for folder in map(Path, folders):
        path = folder / "layercut.json"
        if not path.is_file():
            raise LayercutError(f"{folder} has no layercut.json; give folders written by `layercut prune`")
        records.append((folder.name, json.loads(path.read_text())))
    return records


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(records: list[tuple[str, dict]]) -> str:
    """One row per checkpoint: segments, layers, perplexity dense → pruned, zero-shot average and speed-up."""
    lines = [("| checkpoint | source | removed | layers | parameters | ppl dense | ppl pruned | avg acc dense | "
             "avg acc pruned | retention | decode speed-up (limit) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in records:
        metrics = record.get("metrics", {})
        ppl = metrics.get("perplexity", {})
        zero_shot = metrics.get("zero_shot")
        speed = metrics.get("speed")
        removed = " ".join(f"[{s}:{e})" for s, e in record["segments"])
        speed_up = f"{speed['decode_ratio']:.2f} ({speed['limit']:.2f})" if speed else "-"
        accuracy = [_fmt(zero_shot["before"]["average"]["acc"], 3), _fmt(zero_shot["after"]["average"]["acc"], 3),
                    _fmt(zero_shot["retention"]["average"].get("retention"), 3)] if zero_shot else ["-"] * 3
        lines.append(
            f"| {name} | {record['source']} | {removed} | {record['num_layers_before']} → {record['num_layers_after']} | "
            f"{record['parameters_after'] / 1e6:.1f}M | {_fmt(ppl.get('before'))} | {_fmt(ppl.get('after'))} | "
            f"{' | '.join(accuracy)} | {speed_up} |"
        )
    return "\n".join(lines) + "\n"


def chart(records: list[tuple[str, dict]], path: Path) -> None:
    """Bar chart of dense and pruned perplexity per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in records]
    before = [r.get("metrics", {}).get("perplexity", {}).get("before", float("nan")) for _, r in records]
    after = [r.get("metrics", {}).get("perplexity", {}).get("after", float("nan")) for _, r in records]
    figure, axis = plt.subplots(figsize=(1.4 * len(records) + 3, 3.5))
    positions = range(len(records))
    axis.bar([p - 0.2 for p in positions], before, 0.4, label="dense", color="tab:gray")
    axis.bar([p + 0.2 for p in positions], after, 0.4, label="pruned", color="tab:blue")
    axis.set_xticks(list(positions), names, rotation=20)
    axis.set_ylabel("perplexity")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""Write a pruned model as a standard Hugging Face checkpoint with its recipe, metrics and model card, atomically."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

from layercut.errors import LayercutError

logger = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("layercut", "torch", "transformers", "accelerate", "peft", "lm-eval"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; call before any long work."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise LayercutError(f"output folder {output} already exists; choose another or pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise LayercutError(f"output {output} exists and is not a folder; remove it or choose another name")
    return output


def model_card(record: dict, recipe_yaml: str) -> str:
    """A README.md for the pruned checkpoint that states what was removed and embeds the exact recipe."""
    segments = ", ".join(f"[{s}:{e})" for s, e in record["segments"])
    rows = "\n".join(f"| {name} | {_fmt(before)} | {_fmt(after)} |" for name, before, after in metric_rows(record))
    table = f"| metric | dense | pruned |\n|---|---|---|\n{rows}\n" if rows else "No metrics were recorded.\n"
    return f"""---
library_name: transformers
tags:
- layercut
- pruned
---
# {record.get('name', 'pruned model')}

Pruned with layercut from `{record['source']}`: decoder layers {segments}
(0-based, end exclusive) were removed, leaving {record['num_layers_after']} of {record['num_layers_before']} layers
({record['parameters_after']:,} of {record['parameters_before']:,} parameters). Selection: `{record.get('method')}`;
repair: `{record.get('heal')}`.

It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(path)` loads it without layercut.

## Metrics

{table}
## Recipe

```yaml
{recipe_yaml}```

Full record: `layercut.json`. Library versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.
"""


def metric_rows(record: dict) -> list[tuple[str, float | None, float | None]]:
    """``(name, dense, pruned)`` rows of the record's metrics: perplexity, zero-shot accuracy, speed."""
    metrics = record.get("metrics", {})
    rows = []
    if "perplexity" in metrics:
        ppl = metrics["perplexity"]
        rows.append(((f"perplexity ({ppl.get('text', '?')}, {ppl.get('windows', '?')} x {ppl.get('seq_len', '?')} "
                     "tokens)"), ppl.get("before"), ppl.get("after")))
    if "zero_shot" in metrics:
        before, after = metrics["zero_shot"]["before"], metrics["zero_shot"]["after"]
        for task, values in before["tasks"].items():
            rows.append((f"{task} acc", values.get("acc"), after["tasks"][task].get("acc")))
        rows.append(("zero-shot average acc", before["average"]["acc"], after["average"]["acc"]))
    if "speed" in metrics:
        for kind in ("prefill", "decode"):
            rows.append((f"{kind} tokens/s", metrics["speed"]["before"][f"{kind}_tokens_per_s"],
                         metrics["speed"]["after"][f"{kind}_tokens_per_s"]))
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def replace_folder(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` folder to ``output`` by renames, retiring an existing ``output`` first."""
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        os.replace(output, retired / output.name)
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)


def export_checkpoint(model, tokenizer, output: str | Path, record: dict, recipe_yaml: str, overwrite: bool = False,
                      extra_files: dict[str, Path] | None = None) -> Path:
    """Save weights (safetensors), tokenizer, ``recipe.yaml``, ``layercut.json`` and ``README.md`` into ``output``.

    Everything is written to a temporary folder beside ``output`` and renamed into place at the end, so a failure
    leaves nothing half-written. ``extra_files`` maps names to files copied in too (plots).
    """
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "layercut.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(record, recipe_yaml))
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staging / name)
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", output)
    return output

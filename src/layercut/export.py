"""The export stage: the pruned model as a standard Hugging Face checkpoint, with its recipe, record and model card,
written atomically."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from layercut.files import staged_folder
from layercut.layers import Handle
from layercut.record import RECORD_FILE, RunRecord
from layercut.report import model_card

logger = logging.getLogger(__name__)


def export(handle: Handle, record: RunRecord, recipe_yaml: str, output: str | Path, overwrite: bool = False,
           extra_files: dict[str, Path] | None = None, protected: list[str | Path] = ()) -> Path:
    """Save weights (safetensors), tokenizer, ``recipe.yaml``, ``layercut.json`` and ``README.md`` into ``output``.

    Everything is written to a staging folder beside ``output`` and renamed into place at the end, so a failure
    leaves nothing half-written; ``overwrite`` replaces only an earlier layercut output that holds none of the
    ``protected`` paths (the source model). ``extra_files`` maps names to files copied in too (plots).
    """
    protected = [path for path in protected if Path(path).expanduser().exists()]
    with staged_folder(output, overwrite, protected) as staging:
        handle.model.save_pretrained(staging, safe_serialization=True)
        handle.tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / RECORD_FILE).write_text(record.to_json())
        (staging / "README.md").write_text(model_card(record, recipe_yaml))
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staging / name)
    logger.info("wrote %s", output)
    return Path(output)

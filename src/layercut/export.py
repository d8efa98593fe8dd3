"""The export stage: the pruned model as a standard Hugging Face checkpoint, with its recipe, record and model card,
written atomically."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layercut.errors import LayercutError
from layercut.files import staged_folder
from layercut.layers import Handle, serving_config_problems
from layercut.record import RECORD_FILE, RunRecord
from layercut.report import model_card

if TYPE_CHECKING:
    from layercut.config import ExportOptions

logger = logging.getLogger(__name__)


def export(handle: Handle, record: RunRecord, recipe_yaml: str, output: str | Path, overwrite: bool = False,
           extra_files: dict[str, Path] | None = None, protected: list[str | Path] = (),
           formats: ExportOptions | None = None, test_windows: torch.Tensor | None = None) -> Path:
    """Save weights (safetensors), tokenizer, ``recipe.yaml``, ``layercut.json`` and ``README.md`` into ``output``;
    with ``formats.format`` gguf also the GGUF files, checked against the model on ``test_windows`` ``[N, T]``.

    Everything is written to a staging folder beside ``output`` and renamed into place at the end, so a failure
    (a GGUF that disagrees with the model included) leaves nothing half-written; ``overwrite`` replaces only an
    earlier layercut output that holds none of the ``protected`` paths (the source model). ``extra_files`` maps
    names to files copied in too (plots).
    """
    protected = [path for path in protected if Path(path).expanduser().exists()]
    with staged_folder(output, overwrite, protected) as staging:
        handle.model.save_pretrained(staging, safe_serialization=True)
        handle.tokenizer.save_pretrained(staging)
        for problem in serving_config_problems(json.loads((staging / "config.json").read_text())):
            logger.warning("config.json: %s; serving engines that read it (vLLM) may run the model wrongly", problem)
        if formats is not None and formats.format == "gguf":
            record.gguf = write_ggufs(handle, staging, formats, test_windows)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / RECORD_FILE).write_text(record.to_json())
        (staging / "README.md").write_text(model_card(record, recipe_yaml))
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staging / name)
    logger.info("wrote %s", output)
    return Path(output)


def write_ggufs(handle: Handle, folder: Path, formats: ExportOptions, test_windows: torch.Tensor | None) -> list:
    """The GGUF files of ``formats.gguf_type`` in ``folder`` (where the checkpoint was just saved), each checked on
    the first ``formats.gguf_windows`` test windows; their records."""
    from layercut.gguf import export_ggufs

    if test_windows is None or not len(test_windows):
        raise LayercutError("--format gguf checks each GGUF on held-out windows: give --ppl-windows 1 or more")
    with tempfile.TemporaryDirectory() as scratch:
        return export_ggufs(handle.model, folder, test_windows[: formats.gguf_windows], formats.gguf_type,
                            formats.gguf_layer_pattern, Path(scratch))

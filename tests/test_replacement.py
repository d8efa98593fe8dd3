"""ReplaceMe and LLM-Streamline heals: the math, the fold, what they change, and the cases they refuse."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import LAYERS, build_tiny, random_ids
from layercut import heal
from layercut.config import HealOptions
from layercut.errors import LayercutError
from layercut.heal import HealData
from layercut.layers import Handle, cut
from layercut.replacement import (
    channel_scaling,
    dense_states,
    fold_map,
    hadamard,
    least_squares_map,
    output_projection,
    post_cut_index,
    relative_weights,
    weighted_moments,
)


def test_least_squares_recovers_a_linear_map():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    truth = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    found = least_squares_map(x.T @ x, x.T @ (x @ truth))
    torch.testing.assert_close(found, truth, rtol=1e-6, atol=1e-6)


def test_relative_weights_keep_one_massive_token_from_owning_the_fit():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    truth = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    y = x @ truth
    y[0] = 1e4 * torch.randn(6, generator=generator, dtype=torch.float64)  # a massive activation, off the map
    plain = least_squares_map(x.T @ x, x.T @ y)
    weighted = least_squares_map(*weighted_moments(x, y, relative_weights(y)))
    rest = slice(1, None)
    assert (x[rest] @ plain - y[rest]).norm() > (x[rest] @ truth).norm()  # worse than predicting zero
    torch.testing.assert_close(weighted, truth, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(relative_weights(torch.tensor([[3.0, 4.0]])), torch.tensor([1 / 25], dtype=torch.float64))


def test_replaceme_fits_the_tokens_around_a_massive_activation_formed_in_the_block():
    """The SmolLM2 failure in small: the block's last layer gives the first position a massive state (an attention
    sink); the fit must still bring the other positions closer to the dense state than the plain cut does."""
    model = build_tiny("llama")
    handle = Handle.of(model)

    def sink(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0, 5] += 1e3
        return output

    hook = handle.layers[3].register_forward_hook(sink)
    options = HealOptions(heal="replaceme")
    windows = random_ids(batch=16, length=16, seed=5)
    prepared = heal.before_cut(handle, [(2, 4)], HealData(windows), options)
    dense = next(dense_states(handle, windows, {"entering": (handle.layers[2], True),
                                                "leaving": (handle.layers[3], False)}, windows.shape[0]))
    hook.remove()
    heal.heal(handle, cut(handle, [(2, 4)]), prepared, options)
    after = next(dense_states(handle, windows, {"out": (handle.layers[1], False)}, windows.shape[0]))["out"]
    plain_error = (dense["entering"] - dense["leaving"])[:, 1:].pow(2).mean()
    healed_error = (after - dense["leaving"])[:, 1:].pow(2).mean()
    assert healed_error < plain_error  # unweighted, the first position owns the fit: ~10⁴ times worse


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fold_makes_the_projection_compute_y_times_t(kind):
    generator = torch.Generator().manual_seed(1)
    if kind == "linear":
        projection = torch.nn.Linear(5, 4)
    else:
        projection = transformers.pytorch_utils.Conv1D(4, 5)  # GPT-2's: weight [in, out]
        torch.nn.init.normal_(projection.bias)
    z = torch.randn(3, 5, generator=generator)
    transform = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    expected = (projection(z).double() @ transform).float()
    fold_map(projection, transform)
    torch.testing.assert_close(projection(z), expected, rtol=1e-5, atol=1e-5)


def test_post_cut_index():
    assert post_cut_index(1, [(2, 4)]) == 1
    assert post_cut_index(5, [(2, 4)]) == 3
    assert post_cut_index(7, [(1, 2), (3, 5)]) == 4


def prepared_for(handle, segments, options):
    windows = random_ids(batch=6, length=12, seed=4)
    return heal.before_cut(handle, segments, HealData(windows), options), windows


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi"])
def test_replaceme_brings_the_state_after_the_cut_closer_to_the_dense_one(family):
    model = build_tiny(family)
    handle = Handle.of(model)
    options = HealOptions(heal="replaceme")
    prepared, windows = prepared_for(handle, [(2, 4)], options)
    dense = next(dense_states(handle, windows, {"entering": (handle.layers[2], True),
                                                "leaving": (handle.layers[3], False)}, windows.shape[0]))
    removed = cut(handle, heal.planned_cut([(2, 4)], options))
    report = heal.heal(handle, removed, prepared, options)
    after = next(dense_states(handle, windows, {"out": (handle.layers[1], False)}, windows.shape[0]))["out"]
    plain_error = (dense["entering"] - dense["leaving"]).pow(2).mean()
    healed_error = (after - dense["leaving"]).pow(2).mean()
    assert healed_error < plain_error  # the identity map is one candidate of the least-squares fit
    assert report.name == "replaceme" and report.layers == [1] and report.steps == 0
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    assert report.trainable_parameters == hidden * hidden


def test_replaceme_changes_only_the_projection_before_the_cut_and_stays_a_standard_checkpoint(tmp_path):
    model = build_tiny("llama")
    handle = Handle.of(model)
    options = HealOptions(heal="replaceme")
    prepared, windows = prepared_for(handle, [(2, 4)], options)
    removed = cut(handle, [(2, 4)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    heal.heal(handle, removed, prepared, options)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    model.save_pretrained(tmp_path / "folded")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert reloaded.config.num_hidden_layers == LAYERS - 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, model(windows).logits)


@pytest.mark.parametrize(("family", "segments", "message"), [
    ("gemma2", [(2, 4)], "does not add its MLP's output to the residual stream as it is"),
    ("opt", [(2, 4)], "has no mlp submodule"),
    ("llama", [(0, 2)], "the cut [0:2) has none"),
])
@pytest.mark.parametrize("name", ["replaceme", "lsq", "linearpatch"])
def test_a_linear_patch_refuses_a_fold_that_would_not_be_exact(family, segments, message, name):
    handle = Handle.of(build_tiny(family))
    with pytest.raises(LayercutError, match=message.replace("[", r"\[").replace(")", r"\)")):
        prepared_for(handle, segments, HealOptions(heal=name))


def test_streamline_keeps_and_trains_the_first_layer_of_the_block_to_map_its_input_to_its_output():
    model = build_tiny("llama")
    handle = Handle.of(model)
    options = HealOptions(heal="streamline", heal_steps=60, heal_batch=3, heal_lr=1e-3)
    prepared, _ = prepared_for(handle, [(2, 5)], options)
    assert heal.planned_cut([(2, 5)], options) == [(3, 5)]
    removed = cut(handle, heal.planned_cut([(2, 5)], options))
    assert handle.num_layers == LAYERS - 2  # a block of three replaced by one layer
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = heal.heal(handle, removed, prepared, options)
    changed = {name.split(".")[2] for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed == {"2"} and report.layers == [2]
    assert report.last_loss < 0.5 * report.first_loss
    assert report.trainable_parameters == sum(p.numel() for p in handle.layers[2].parameters())
    assert all("forward" not in layer.__dict__ and not layer._forward_hooks for layer in handle.layers)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # nothing left of the training


def test_streamline_needs_blocks_of_two_layers_or_more():
    handle = Handle.of(build_tiny("llama"))
    with pytest.raises(LayercutError, match="has one layer"):
        heal.planned_cut([(2, 3)], HealOptions(heal="streamline"))
    assert output_projection(handle.layers[0]) is handle.layers[0].mlp.down_proj


# ----------------------------------------------------------------------------------------------- linear patches


def test_hadamard_is_orthonormal_and_block_diagonal_where_the_size_is_not_a_power_of_two():
    for size in (32, 48, 576):
        rotation = hadamard(size)
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(size, dtype=torch.float64))
    assert hadamard(48)[0, 16] == 0 and hadamard(48)[0, 15] != 0  # 48 = 3 blocks of 16


def test_channel_scaling_recovers_a_rotated_diagonal_map():
    generator = torch.Generator().manual_seed(3)
    rotation = hadamard(16)
    scales = torch.rand(16, generator=generator, dtype=torch.float64) + 0.5
    truth = rotation @ torch.diag(scales) @ rotation.T
    x = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    found = channel_scaling(rotation, (x @ rotation).pow(2).sum(0), (x @ truth @ rotation).pow(2).sum(0))
    torch.testing.assert_close(found, truth)


def linear_block_model(transform: torch.Tensor):
    """A tiny Llama whose block [2, 4) IS a linear map of what enters it, of the one form a fold reproduces: with
    ``h_s = r + m`` the output of layer 1 (``m`` its MLP's output, ``r`` the residual that MLP adds to), layer 3's
    output is replaced by ``r + m T`` (so the block computes ``h_s + m (T − I)``; what layers 2 and 3 compute
    inside is discarded). Returns the model, its handle and the hooks that make it so."""
    model = build_tiny("llama")
    handle = Handle.of(model)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def linear(module, args, output):
        m = seen["m"]
        replaced = seen["h"] - m + (m.double() @ transform).to(m.dtype)
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    hooks = [handle.layers[1].mlp.register_forward_hook(keep("m")), handle.layers[1].register_forward_hook(keep("h")),
             handle.layers[3].register_forward_hook(linear)]
    return model, handle, hooks


@pytest.mark.parametrize("name", ["lsq", "linearpatch"])
def test_a_patch_reproduces_a_block_that_is_a_linear_map_and_saves_as_a_standard_checkpoint(name, tmp_path):
    generator = torch.Generator().manual_seed(7)
    hidden = build_tiny("llama").config.hidden_size
    if name == "lsq":  # any well-conditioned map
        transform = torch.eye(hidden, dtype=torch.float64) + 0.3 * torch.randn(
            hidden, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5
    else:  # the maps LinearPatch can represent: rotated positive channel scales
        scales = torch.rand(hidden, generator=generator, dtype=torch.float64) * 1.5 + 0.5
        transform = hadamard(hidden) @ torch.diag(scales) @ hadamard(hidden).T
    model, handle, hooks = linear_block_model(transform)
    windows = random_ids(batch=12, length=16, seed=8)  # 192 tokens: more than the 32 dimensions of the fit
    with torch.no_grad():
        dense = model(windows).logits
    options = HealOptions(heal=name)
    prepared = heal.before_cut(handle, [(2, 4)], HealData(windows), options)
    for hook in hooks:
        hook.remove()
    removed = cut(handle, [(2, 4)])
    with torch.no_grad():
        plain = model(windows).logits
    report = heal.heal(handle, removed, prepared, options)
    with torch.no_grad():
        patched = model(windows).logits
    assert (plain - dense).abs().max() > 1e-2  # the cut alone is far off
    torch.testing.assert_close(patched, dense, rtol=1e-4, atol=1e-4)
    assert report.name == name and report.layers == [1] and report.steps == 0
    model.save_pretrained(tmp_path / "patched")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, patched)


def test_endpoint_tuning_starts_from_the_patch_with_heal_init():
    windows = random_ids(batch=8, length=12, seed=4)
    results = {}
    for key, options in {"patch": HealOptions(heal="lsq"),
                         "init": HealOptions(heal="endpoints", heal_init="lsq", heal_steps=1, heal_lr=1e-12,
                                             heal_loss="lm")}.items():
        handle = Handle.of(build_tiny("llama"))
        prepared = heal.before_cut(handle, [(2, 4)], HealData(windows), options)
        report = heal.heal(handle, cut(handle, [(2, 4)]), prepared, options)
        with torch.no_grad():
            results[key] = (handle.model(windows).logits, report)
    torch.testing.assert_close(results["init"][0], results["patch"][0], rtol=1e-5, atol=1e-5)
    assert results["init"][1].name == "endpoints" and results["init"][1].steps == 1


def test_heal_init_needs_a_training_heal():
    with pytest.raises(LayercutError, match="--heal-init lsq starts a training heal"):
        HealOptions(heal="replaceme", heal_init="lsq")
    with pytest.raises(LayercutError, match="--heal-init"):
        HealOptions(heal="none", heal_init="linearpatch")

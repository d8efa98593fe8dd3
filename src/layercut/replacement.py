"""Heals that stand in for the removed block: the training-free linear patches folded into the layer before the cut
(ReplaceMe's weighted least-squares map, the Ghosted Layers least-squares operator ``lsq``, LinearPatch's rotated
channel scaling) and LLM-Streamline's replacement layer, trained to map the block's input to its output.

Both read the dense model before the cut (``collect``) and change the cut model after it (``apply``); both leave a
standard checkpoint. Indices of segments are the original model's, 0-based and half-open.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from layercut.errors import LayercutError
from layercut.forward import batches, final_hidden, frozen, model_device, optimizer_step, replaced_layers
from layercut.layers import Cut, Handle, Segment
from layercut.record import HealReport

if TYPE_CHECKING:
    from layercut.config import HealOptions
    from layercut.heal import HealData

logger = logging.getLogger(__name__)

# LLM-Streamline's default learning rate (``heal.HEALS["streamline"]``).
STREAMLINE_LEARNING_RATE = 1e-3


# ----------------------------------------------------------------------------------------------- pure math


def least_squares_map(gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """``T`` ``[d, d]`` minimising Σ‖x T − y‖² from ``gram = XᵀX`` and ``cross = XᵀY`` (float64), with a ridge
    of ``ridge`` times the mean diagonal of the Gram matrix so that a rank-deficient X still has one answer."""
    scale = ridge * float(gram.diagonal().mean().clamp(min=1e-30))
    return torch.linalg.solve(gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross)


def relative_weights(leaving: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``1 / ‖h_e‖²`` ``[N]`` (float64) for the states ``leaving`` ``[N, H]`` the fit aims at: the
    weighted squared error is the error relative to each token's own state, the scale the next layer's input norm
    reads. Without them one token with a massive activation (the first position, where an attention sink forms
    inside the block) holds nearly all of Σ‖M T − y‖² and the fit serves it alone."""
    return 1.0 / leaving.double().pow(2).sum(-1).clamp(min=1e-12)


def weighted_moments(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xᵀ W X, Xᵀ W Y)`` in float64 for rows ``x`` ``[N, d]``, ``y`` ``[N, d]`` and row weights ``[N]``."""
    xw = x.double() * weights.double()[:, None]
    return xw.T @ x.double(), xw.T @ y.double()


def fold_map(projection: nn.Module, transform: torch.Tensor) -> None:
    """Make ``projection`` compute ``y T`` where it computed ``y`` (row vectors), in place: for an ``nn.Linear``
    (weight ``[out, in]``) ``W ← Tᵀ W``; for a GPT-2 ``Conv1D`` (weight ``[in, out]``) ``W ← W T``; a bias
    ``b ← b T``."""
    weight = projection.weight
    t = transform.to(device=weight.device, dtype=torch.float64)
    with torch.no_grad():
        folded = (weight.double() @ t) if type(projection).__name__ == "Conv1D" else (t.T @ weight.double())
        weight.copy_(folded.to(weight.dtype))
        if getattr(projection, "bias", None) is not None:
            projection.bias.copy_((projection.bias.double() @ t).to(projection.bias.dtype))


# ----------------------------------------------------------------------------------------------- model plumbing


def output_projection(layer: nn.Module) -> nn.Module:
    """The last linear projection of the layer's MLP (``down_proj``, ``c_proj``, ``fc2``, ...): the one ReplaceMe
    folds into. LayercutError when the layer has no ``mlp`` submodule with a linear projection."""
    mlp = getattr(layer, "mlp", None)
    linear = [m for m in mlp.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"] if mlp else []
    if not linear:
        raise LayercutError(f"a linear patch (replaceme, lsq, linearpatch) is folded into the MLP of the layer before "
                            f"the cut; {type(layer).__name__} "
                            "has no mlp submodule with a linear projection: use --heal endpoints")
    return linear[-1]


def post_cut_index(original: int, segments: Sequence[Segment]) -> int:
    """Index, after cutting ``segments``, of the kept layer ``original``."""
    return original - sum(min(end, original) - start for start, end in segments if start < original)


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the layer of interest has run."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def _stop_after(layer: nn.Module):
    def hook(module, args, kwargs, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    return layer.register_forward_hook(hook, with_kwargs=True)


def layer_output(handle: Handle, index: int, input_ids: torch.Tensor, entering: torch.Tensor | None) -> torch.Tensor:
    """The output ``[b, T, H]`` of decoder layer ``index`` when it receives ``entering`` (the state the model would
    give it; None: run the layers before it): the rest of the model does not run."""
    replay = (index - 1, entering) if entering is not None and index > 0 else None
    hook = _stop_after(handle.layers[index])
    try:
        with replaced_layers(handle.layers, set(range(max(index - 1, 0))) if replay else set(), replay):
            final_hidden(handle.model, input_ids)
    except _Stop as stop:
        return stop.output
    finally:
        hook.remove()
    raise AssertionError(f"decoder layer {index} did not run")


@torch.no_grad()
def dense_states(handle: Handle, windows: torch.Tensor, wanted: dict[str, tuple[nn.Module, bool]], batch_size: int):
    """Yield, per batch of ``windows``, a dict of captured tensors: for each name, ``(module, input)`` captures the
    module's first input (``input``) or its output. Each forward ends once every wanted tensor is captured: the
    layers after the deepest wanted module do not run."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str, take_input: bool):
        def hook(module, args, kwargs, output):
            value = (args[0] if args else kwargs["hidden_states"]) if take_input else output
            captured[name] = value[0] if isinstance(value, tuple) else value
            if len(captured) == len(wanted):
                raise _Stop(output)
        return hook

    hooks = [module.register_forward_hook(capture(name, take_input), with_kwargs=True)
             for name, (module, take_input) in wanted.items()]
    try:
        for batch in batches(windows, batch_size):
            captured.clear()
            with contextlib.suppress(_Stop):
                final_hidden(handle.model, batch)
            yield dict(captured)
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------- ReplaceMe


def check_foldable(handle: Handle, index: int, windows: torch.Tensor,
                   fix: str = "use --heal endpoints or streamline") -> None:
    """LayercutError (ending in ``fix``) unless layer ``index`` adds its MLP's output to the residual stream as it
    is (no norm or scale after the MLP) and that output is its last projection's: scaling the MLP's output by 2
    must move the layer's output by exactly that output."""
    layer = handle.layers[index]
    projection = output_projection(layer)
    batch = windows[:1, : min(windows.shape[1], 16)]
    plain = next(dense_states(handle, batch, {"out": (layer, False), "mlp": (layer.mlp, False),
                                              "proj": (projection, False)}, 1))
    doubling = layer.mlp.register_forward_hook(lambda module, args, output: output * 2)
    try:
        doubled = next(dense_states(handle, batch, {"out": (layer, False)}, 1))
    finally:
        doubling.remove()
    moved = (doubled["out"] - plain["out"]).float()
    scale = float(plain["mlp"].float().abs().max()) + 1e-12
    if not (torch.allclose(plain["proj"].float(), plain["mlp"].float(), atol=1e-4 * scale)
            and torch.allclose(moved, plain["mlp"].float(), atol=1e-3 * scale)):
        raise LayercutError(f"a linear patch (replaceme, lsq, linearpatch) is folded into the MLP of the layer before "
                            "the cut, but "
                            f"{type(layer).__name__} does not add its MLP's output to the residual stream as it is "
                            f"(a norm or scale follows it), so the fold would not be exact: {fix}")


def _write_pairs(handle: Handle, start: int, end: int, windows: torch.Tensor, batch_size: int):
    """Per batch of ``windows``, on the dense model, for the cut ``[start, end)``: ``(m, target, leaving)``, each
    ``[tokens, H]`` (float64 but ``leaving``): ``m`` the MLP output of layer start − 1 (the last write before the
    cut), ``target = h_e − h_s + m`` what that write must become for the layer's output to be ``h_e`` (the state
    leaving the cut; ``h_s`` the state entering it), and ``leaving`` = ``h_e``. LayercutError where folding a map
    into that write would not be exact."""
    if start == 0:
        raise LayercutError(f"a linear patch is folded into the layer before the cut; the cut [0:{end}) has none: "
                            "use --heal endpoints or streamline, or cut elsewhere")
    before = handle.layers[start - 1]
    check_foldable(handle, start - 1, windows)
    wanted = {"mlp": (before.mlp, False), "entering": (before, False), "leaving": (handle.layers[end - 1], False)}
    for states in dense_states(handle, windows, wanted, batch_size):
        m = states["mlp"].flatten(0, 1).double()
        leaving = states["leaving"].flatten(0, 1).to(m.device)
        yield m, leaving.double() - states["entering"].flatten(0, 1).to(m.device).double() + m, leaving


def _least_squares_maps(handle: Handle, segments: list[Segment], windows: torch.Tensor, batch_size: int,
                        weighted: bool) -> dict[Segment, torch.Tensor]:
    """Per segment, ``T`` minimising Σ w‖m T − target‖² over the tokens of ``windows`` (:func:`_write_pairs`);
    ``w = 1/‖h_e‖²`` when ``weighted``, else 1."""
    maps = {}
    for start, end in segments:
        gram = cross = None
        for m, target, leaving in _write_pairs(handle, start, end, windows, batch_size):
            weights = relative_weights(leaving) if weighted else torch.ones(m.shape[0], dtype=m.dtype,
                                                                              device=m.device)
            moments = weighted_moments(m, target, weights)
            gram, cross = moments if gram is None else (gram + moments[0], cross + moments[1])
        maps[(start, end)] = least_squares_map(gram, cross)
    return maps


def replaceme_collect(handle: Handle, segments: list[Segment], prepared: HealData, options: HealOptions,
                      batch_size: int = 4) -> dict[Segment, torch.Tensor]:
    """ReplaceMe's least-squares map for each segment ``[s, e)``, fitted on the dense model over the heal windows:
    with ``M`` the MLP output of layer s − 1, ``h_s`` the state entering layer s and ``h_e`` the state entering layer
    e, ``T`` minimises Σ‖M T − (h_e − h_s + M)‖² / ‖h_e‖² over the tokens, so that the layer before the cut, its MLP
    output mapped by T, gives ``h_e`` (the attention part of its residual passes unchanged). The paper's fit is
    unweighted; the weights (:func:`relative_weights`) keep a massive activation that forms inside the block from
    owning the fit (SmolLM2-135M, [9:19): wiki perplexity 951 unweighted, 101 weighted, 158 with no heal)."""
    return _least_squares_maps(handle, segments, prepared.windows, batch_size, weighted=True)


def lsq_collect(handle: Handle, segments: list[Segment], prepared: HealData, options: HealOptions,
                batch_size: int = 4) -> dict[Segment, torch.Tensor]:
    """The Ghosted Layers alignment (arXiv 2605.15491): the least-squares linear operator from the state entering
    the cut to the one leaving it, min Σ‖h_s + m B − h_e‖² over every ``[H, H]`` matrix B, unweighted. The paper's
    operator acts on the whole state ``h_s`` as an added matrix; a standard checkpoint has no place for one, and in
    a pre-norm decoder the only exact fold of a map is into the last write before the cut (the MLP output m of
    layer s − 1, whose output is ``h_s = r + m``). So the operator is the identity plus a map of that write, folded
    as ``T = I + B`` into the MLP's output projection: ReplaceMe's objective without its 1/‖h_e‖² weights."""
    return _least_squares_maps(handle, segments, prepared.windows, batch_size, weighted=False)


def hadamard(size: int) -> torch.Tensor:
    """An orthonormal ``[size, size]`` Hadamard rotation (float64): Sylvester's construction when ``size`` is a
    power of two, else block-diagonal with blocks of the largest power of two dividing ``size`` (576 = 9 × 64,
    640 = 5 × 128; an odd size gets the identity)."""
    block = size & -size
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < block:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return torch.block_diag(*[sylvester / block ** 0.5] * (size // block))


def channel_scaling(rotation: torch.Tensor, source_squares: torch.Tensor, target_squares: torch.Tensor
                    ) -> torch.Tensor:
    """LinearPatch's map ``R diag(s) Rᵀ`` ``[H, H]``: rotate by ``R``, scale rotated channel j by
    ``s_j = rms(target)_j / rms(source)_j`` (from the sums of squares ``[H]`` of the rotated source and target
    channels over the same tokens), rotate back. A channel the source never uses keeps scale 1."""
    scale = (target_squares / source_squares.clamp(min=1e-30)).sqrt()
    scale = torch.where(source_squares > 0, scale, torch.ones_like(scale))
    return rotation @ torch.diag(scale) @ rotation.T


def linearpatch_collect(handle: Handle, segments: list[Segment], prepared: HealData, options: HealOptions,
                        batch_size: int = 4) -> dict[Segment, torch.Tensor]:
    """LinearPatch (arXiv 2505.24680): a Hadamard rotation that spreads massive outlier channels, a per-channel
    scaling that aligns activation magnitudes across the cut, and the rotation back, fused into one matrix. The
    paper patches the whole hidden state at the interface with that matrix; here, for the same reason as
    :func:`lsq_collect`, the matrix maps the last write before the cut (m → m T, folded into the MLP's output
    projection), and the scales are the ratio of the rotated channels' root mean squares of what that write must
    become (``h_e − h_s + m``) and of the write itself. The paper's optional distillation of the patch is not done
    (``--heal-init linearpatch`` with a training heal is the trained counterpart)."""
    patches = {}
    for start, end in segments:
        rotation = source = target = None
        for m, wanted, _ in _write_pairs(handle, start, end, prepared.windows, batch_size):
            rotation = hadamard(m.shape[-1]).to(m.device) if rotation is None else rotation
            squares = ((m @ rotation).pow(2).sum(0), (wanted @ rotation).pow(2).sum(0))
            source, target = squares if source is None else (source + squares[0], target + squares[1])
        patches[(start, end)] = channel_scaling(rotation, source, target)
    return patches


def fold_apply(handle: Handle, cut: Cut, prepared: HealData, options: HealOptions, seed: int = 0,
               progress=None, name: str | None = None) -> HealReport:
    """Fold each segment's map (``prepared.collected``) into the MLP output projection of the (post-cut) layer
    before it: the apply step of replaceme, lsq and linearpatch."""
    name = name or options.heal
    started = time.perf_counter()
    changed = []
    for (start, end), transform in prepared.collected.items():
        index = post_cut_index(start - 1, cut.segments)
        fold_map(output_projection(handle.layers[index]), transform)
        changed.append(index)
    fitted = sum(t.numel() for t in prepared.collected.values())
    logger.info("%s: folded %d map(s) into layers %s", name, len(changed), changed)
    return HealReport(name=name, layers=changed, trainable_parameters=fitted, steps=0,
                      loss="channel scaling" if name == "linearpatch" else "least squares",
                      seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- LLM-Streamline


def streamline_cut(segments: list[Segment]) -> list[Segment]:
    """Streamline keeps the first layer of each chosen segment as the block's replacement: it cuts the rest."""
    for start, end in segments:
        if end - start < 2:
            raise LayercutError(f"streamline replaces a block by one of its layers; the segment [{start}:{end}) has "
                                "one layer, so nothing would be removed: remove more, or use another heal")
    return [(start + 1, end) for start, end in segments]


def streamline_collect(handle: Handle, segments: list[Segment], prepared: HealData, options: HealOptions,
                       batch_size: int = 4) -> dict[Segment, tuple[torch.Tensor, torch.Tensor]]:
    """For each chosen segment ``[s, e)``: the dense states entering layer s and layer e over the heal windows
    (``[N, T, H]`` each, on the CPU): the pairs the replacement layer learns to map."""
    pairs = {}
    for start, end in segments:
        wanted = {"entering": (handle.layers[start], True), "leaving": (handle.layers[end - 1], False)}
        inputs, targets = [], []
        for states in dense_states(handle, prepared.windows, wanted, batch_size):
            inputs.append(states["entering"].cpu())
            targets.append(states["leaving"].cpu())
        pairs[(start, end)] = (torch.cat(inputs), torch.cat(targets))
    return pairs


def streamline_apply(handle: Handle, cut: Cut, prepared: HealData, options: HealOptions, seed: int = 0,
                     progress=None) -> HealReport:
    """Train each kept first layer (now the block's replacement) to map the state entering the chosen block to the
    state leaving it: mean squared error, AdamW, ``heal_steps`` steps of ``heal_batch`` windows; the rest of the
    model is frozen and does not run."""
    started = time.perf_counter()
    model, windows = handle.model, prepared.windows
    indices = {segment: post_cut_index(segment[0], cut.segments) for segment in prepared.collected}
    model.requires_grad_(False)
    trainable = [p for index in indices.values() for p in handle.layers[index].parameters()]
    for p in trainable:
        p.requires_grad_(True)
    learning_rate = STREAMLINE_LEARNING_RATE if options.heal_lr is None else options.heal_lr
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    losses = []
    try:
        for step in range(options.heal_steps):
            picks = torch.randint(0, windows.shape[0], (min(options.heal_batch, windows.shape[0]),),
                                  generator=generator)
            loss = 0.0
            for segment, (inputs, targets) in prepared.collected.items():
                index = indices[segment]
                entering = inputs[picks].to(device) if index > 0 else None
                output = layer_output(handle, index, windows[picks].to(device), entering)
                loss = loss + F.mse_loss(output.float(), targets[picks].to(output.device).float())
            losses.append(optimizer_step(optimizer, loss, step, options, learning_rate))
            if progress is not None:
                progress(1)
    finally:
        frozen(model)
    model.eval()
    return HealReport(name="streamline", layers=sorted(indices.values()),
                      trainable_parameters=sum(p.numel() for p in trainable), learning_rate=learning_rate,
                      steps=options.heal_steps, loss="mse", first_loss=losses[0],
                      last_loss=sum(losses[-10:]) / len(losses[-10:]), seconds=time.perf_counter() - started)

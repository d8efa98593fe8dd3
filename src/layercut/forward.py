"""Forward passes that score cuts: gate hooks on the decoder layers, per-layer checkpointing, the output head
applied in chunks, the exact KL of hard cuts, and the hidden states between layers.

The gate search, the exact oracle and the baseline criteria all run the model through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layercut.errors import LayercutError
from layercut.layers import Candidate, Handle, text_config

# ----------------------------------------------------------------------------------------------- pure math


def batches(windows: torch.Tensor, batch_size: int):
    """Yield ``[b, T]`` slices of ``windows`` ``[N, T]`` in order."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def hard_gates(candidates: Sequence[Candidate], num_layers: int) -> torch.Tensor:
    """Gate values ``[R, L]``: 0 inside each candidate's segments, 1 elsewhere."""
    gates = torch.ones(len(candidates), num_layers)
    for row, segments in enumerate(candidates):
        for start, end in segments:
            gates[row, start:end] = 0
    return gates


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per-row mean over tokens of KL(teacher ‖ student) of next-token distributions, in nats.

    ``teacher_logits`` ``[b, T, V]``, ``student_logits`` ``[R·b, T, V]`` (R profiles stacked row-wise, each over
    the same b windows). Returns ``[R·b]``. Works in float32 over chunks of ``chunk`` positions so no full-size
    float32 copy of the logits exists.
    """
    repeats = student_logits.shape[0] // teacher_logits.shape[0]
    total = student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
    length = student_logits.shape[1]
    for start in range(0, length, chunk):
        log_p = F.log_softmax(teacher_logits[:, start : start + chunk].float(), dim=-1).repeat(repeats, 1, 1)
        log_q = F.log_softmax(student_logits[:, start : start + chunk].float(), dim=-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum(dim=(-1, -2))
    return total / length


# ----------------------------------------------------------------------------------------------- hooks


def model_device(model) -> torch.device:
    """Device of the model's input embedding (where input ids must go, also for a dispatched model)."""
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def gated(layers: nn.ModuleList):
    """Install gate hooks on every decoder layer; yields a setter taking gates ``[R, L]`` (or None = dense).

    Layer i then returns ``h + g_i·(f_i(h) − h)``. With R profiles the batch must hold R stacked copies of the
    windows; row r·b + j uses profile r.
    """
    state: dict[str, torch.Tensor | None] = {"gates": None}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            gates = state["gates"]
            if gates is None:
                return output
            out = output[0] if isinstance(output, tuple) else output
            # on a model split over devices the layer's input may still sit on the previous layer's device
            hidden = (args[0] if args else kwargs["hidden_states"]).to(out.device)
            per_row = gates[:, index].to(device=out.device, dtype=out.dtype)
            per_row = per_row.repeat_interleave(out.shape[0] // per_row.shape[0]).view(-1, 1, 1)
            mixed = hidden + per_row * (out - hidden)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def set_gates(gates: torch.Tensor | None) -> None:
        state["gates"] = gates

    try:
        yield set_gates
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def checkpointed_layers(model, layers: nn.ModuleList):
    """Recompute each decoder layer during backward instead of storing its activations (transformers'
    gradient checkpointing, non-reentrant).

    transformers checkpoints a layer only while ``layer.training`` is true, so exactly those flags are set; every
    submodule stays in eval mode, so dropout stays off. Gate hooks run inside the checkpointed call and read the
    gates again on recompute: the gates must stay installed until backward has run.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LayercutError(f"{type(model).__name__} does not support gradient checkpointing; "
                            "run the gate search without --gate-checkpointing")
    flags = [layer.training for layer in layers]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.training = flag
        model.gradient_checkpointing_disable()


# ----------------------------------------------------------------------------------------------- outputs


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, T, V]`` for ``input_ids`` ``[b, T]`` placed on the model's input device."""
    return model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states ``[b, T, H]`` the output head reads (after the final norm), without the logits."""
    return model.base_model(input_ids=input_ids.to(model_device(model)), use_cache=False).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, t, V]`` of final hidden states ``[b, t, H]``: the output head, then the config's final logit
    soft-capping when it has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_reproduces_logits(model, input_ids: torch.Tensor) -> bool:
    """Whether :func:`head_logits` of :func:`final_hidden` equals the model's own logits on ``input_ids``.

    A model that does more after its output head than soft-capping (a logit scale, say) fails this check and
    is scored on its full logits instead.
    """
    with torch.no_grad():
        full = logits_of(model, input_ids).float()
        try:
            split = head_logits(model, final_hidden(model, input_ids)).float()
        except (AttributeError, TypeError):
            return False
    return split.shape == full.shape and torch.allclose(split.to(full.device), full, rtol=1e-3,
                                                         atol=1e-3 * float(full.abs().max()))


def _chunk_kl(model, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher = head_logits(model, teacher_hidden)
    return token_kl(teacher, head_logits(model, student_hidden), chunk=teacher_hidden.shape[1])


def head_kl(model, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, budget: int = 2**25) -> torch.Tensor:
    """:func:`token_kl` of the logits of final hidden states, computed over chunks of positions.

    ``teacher_hidden`` ``[b, T, H]``, ``student_hidden`` ``[R·b, T, H]``; returns ``[R·b]``. Each chunk holds at
    most ``budget`` logits per copy, so the ``[R·b, T, V]`` logits never exist whole; with gradients on, each
    chunk is recomputed in backward (checkpointed) rather than kept.
    """
    rows, length = student_hidden.shape[:2]
    vocab = int(getattr(model.get_output_embeddings(), "out_features", 0) or text_config(model).vocab_size)
    chunk = max(1, budget // (rows * vocab))
    total = 0.0
    for start in range(0, length, chunk):
        teacher, student = teacher_hidden[:, start : start + chunk], student_hidden[:, start : start + chunk]
        if torch.is_grad_enabled() and student.requires_grad:
            piece = checkpoint(_chunk_kl, model, teacher, student, use_reentrant=False)
        else:
            piece = _chunk_kl(model, teacher, student)
        total = total + piece * teacher.shape[1]
    return total / length


def outputs_of(model, input_ids: torch.Tensor, chunked_head: bool) -> torch.Tensor:
    """Final hidden states (``chunked_head``) or logits: what :func:`kl_rows` compares."""
    return final_hidden(model, input_ids) if chunked_head else logits_of(model, input_ids)


def kl_rows(model, teacher: torch.Tensor, student: torch.Tensor, chunked_head: bool) -> torch.Tensor:
    """Per-row token KL(teacher ‖ student) ``[R·b]`` of :func:`outputs_of` values."""
    return head_kl(model, teacher, student) if chunked_head else token_kl(teacher, student)


def hard_kl(handle: Handle, windows: torch.Tensor, candidates: Sequence[Candidate], batch_size: int = 4,
            rows_per_pass: int = 16, chunked_head: bool | None = None) -> list[float]:
    """Mean token KL(dense ‖ cut) over ``windows`` ``[N, T]`` for each candidate cut (gates exactly 0/1).

    The dense teacher is the same model with gates off, computed once per batch of windows. ``chunked_head``
    (None = check with :func:`head_reproduces_logits`) keeps only final hidden states and applies the output
    head chunk by chunk.
    """
    model = handle.model
    if chunked_head is None:
        chunked_head = head_reproduces_logits(model, windows[:1, :16])
    gates = hard_gates(candidates, handle.num_layers)
    totals = torch.zeros(len(candidates))
    with torch.no_grad(), gated(handle.layers) as set_gates:
        for batch in batches(windows, batch_size):
            set_gates(None)
            teacher = outputs_of(model, batch, chunked_head)
            group = max(1, rows_per_pass // batch.shape[0])
            for first in range(0, len(candidates), group):
                chunk = gates[first : first + group]
                set_gates(chunk)
                student = outputs_of(model, batch.repeat(chunk.shape[0], 1), chunked_head)
                kl = kl_rows(model, teacher, student, chunked_head).view(chunk.shape[0], batch.shape[0]).sum(dim=1)
                totals[first : first + group] += kl.cpu()
            set_gates(None)
    return (totals / windows.shape[0]).tolist()


# ----------------------------------------------------------------------------------------------- hidden states


@torch.no_grad()
def mean_over_windows(handle: Handle, windows: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                      batch_size: int = 4) -> torch.Tensor:
    """Window-weighted mean of ``score(states [L+1, b, T, D])`` over batches of ``windows`` ``[N, T]``.

    ``states[i]`` is what decoder layer i receives, ``states[L]`` what the last layer returns, captured by
    hooks on the layers (exact for every family, unlike ``output_hidden_states``, whose last entry has the final
    norm applied). One batch's states are held at once.
    """
    layers = handle.layers
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if module is layers[0]:
            captured.append(args[0] if args else kwargs["hidden_states"])
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    total = None
    try:
        for batch in batches(windows, batch_size):
            captured.clear()
            logits_of(handle.model, batch)
            states = torch.stack([state.to(captured[0].device) for state in captured])
            part = score(states).cpu() * batch.shape[0]
            total = part if total is None else total + part
    finally:
        for hook_handle in hooks:
            hook_handle.remove()
        captured.clear()
    return total / windows.shape[0]

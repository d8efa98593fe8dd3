"""Forward passes that score cuts: gate hooks on the decoder layers, per-layer checkpointing, the output head
applied in chunks, the exact KL of hard cuts, the hidden states between layers, and the heals' training step.

The gate search, the exact oracle and the baseline criteria all run the model through here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layercut.errors import LayercutError
from layercut.layers import Candidate, Handle, text_config

if TYPE_CHECKING:
    from layercut.config import HealOptions

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


def final_norm(model) -> nn.Module | None:
    """The norm the decoder applies after its last layer (``norm``, ``final_layernorm``, ``ln_f`` or
    ``final_layer_norm`` of the decoder), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return next((getattr(decoder, name) for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm")
                 if decoder is not None and isinstance(getattr(decoder, name, None), nn.Module)), None)


def vocab_size(model) -> int:
    """Entries of the model's output head (its ``out_features``, else the config's ``vocab_size``)."""
    return int(getattr(model.get_output_embeddings(), "out_features", 0) or text_config(model).vocab_size)


def model_device(model) -> torch.device:
    """Device of the model's input embedding (where input ids must go, also for a dispatched model)."""
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def gated(layers: nn.ModuleList):
    """Install gate hooks on every decoder layer; yields a setter taking gates ``[R, L]`` (or None = dense) and
    optionally ``first``, the first layer the gates act on.

    Layer i then returns ``h + g_i·(f_i(h) − h)``; layers before ``first`` run ungated (their gates count as
    exactly 1, so no gradient flows below ``first``). With R profiles the batch must hold R stacked copies of the
    windows; row r·b + j uses profile r.
    """
    state: dict = {"gates": None, "first": 0, "placed": {}}

    def placed(device: torch.device) -> torch.Tensor:
        """The gates on ``device``, copied there once per :func:`set_gates`: a copy between the host and a GPU
        waits for the GPU, so a copy per layer (and its gradient's, back, in backward) would keep the host from
        queueing the next layers' work while the GPU runs."""
        if device not in state["placed"]:
            state["placed"][device] = state["gates"].to(device)
        return state["placed"][device]

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            if state["gates"] is None or index < state["first"]:
                return output
            out = output[0] if isinstance(output, tuple) else output
            # on a model split over devices the layer's input may still sit on the previous layer's device
            hidden = (args[0] if args else kwargs["hidden_states"]).to(out.device)
            per_row = placed(out.device)[:, index].to(dtype=out.dtype)
            per_row = per_row.repeat_interleave(out.shape[0] // per_row.shape[0]).view(-1, 1, 1)
            mixed = hidden + per_row * (out - hidden)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def set_gates(gates: torch.Tensor | None, first: int = 0) -> None:
        state["gates"], state["first"], state["placed"] = gates, first, {}

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

    transformers also hooks the input embeddings so that their output requires grad, and does not unhook them when
    checkpointing is disabled; non-reentrant checkpointing does not need it, and left on it makes every later
    backward (the heal's) run through every layer down to the embeddings. Unless the model had that hook before,
    it is removed at once.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LayercutError(f"{type(model).__name__} does not support gradient checkpointing; "
                            "run the search without --gate-checkpointing")
    flags = [layer.training for layer in layers]
    hooked = bool(getattr(model, "_require_grads_hooks", None))  # transformers' record of that hook (PEFT sets it)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not hooked:
        model.disable_input_require_grads()
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
    soft-capping when it has one. The head reads the states as one ``[b·t, H]`` matrix: a chunk of positions is a
    strided view, and a 3-D input that needs gradients goes through a batched product with the head's weight
    repeated per row, about three times slower on the CPU."""
    flat = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]))
    logits = flat.view(*hidden.shape[:-1], flat.shape[-1])
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


def position_chunks(rows: int, length: int, vocab: int, budget: int) -> list[slice]:
    """Slices of the positions ``[0, length)`` whose logits, ``rows`` × chunk × ``vocab``, stay within ``budget``
    (at least one position each)."""
    chunk = max(1, budget // (rows * vocab))
    return [slice(start, start + chunk) for start in range(0, length, chunk)]


def recomputed(function: Callable[..., torch.Tensor], *arguments) -> torch.Tensor:
    """``function(*arguments)``; where a gradient flows through a tensor argument, checkpointed, so that its
    intermediates (a chunk's logits) are recomputed in backward rather than kept."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in arguments):
        return checkpoint(function, *arguments, use_reentrant=False)
    return function(*arguments)


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
    total = 0.0
    for part in position_chunks(rows, length, vocab_size(model), budget):
        teacher, student = teacher_hidden[:, part], student_hidden[:, part]
        total = total + recomputed(_chunk_kl, model, teacher, student) * teacher.shape[1]
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


# ----------------------------------------------------------------------------------------------- shared exact scoring


@contextlib.contextmanager
def replaced_layers(layers: nn.ModuleList, identity: set[int], replay: tuple[int, torch.Tensor] | None = None,
                    tuple_output: bool = False):
    """Layers in ``identity`` return their input without computing; with ``replay = (i, state)`` layer i returns
    ``state`` instead. A hard cut is the identity on its removed layers, and a cut model's layers before its first
    cut compute exactly what the dense model's do, so a dense state can stand in for them. Each layer's own
    ``forward`` (accelerate's wrapper, on a dispatched model) is put back afterwards."""
    saved = {index: layers[index].__dict__.get("forward") for index in (*identity, *(replay[:1] if replay else ()))}

    def returning(value):
        return (value,) if tuple_output else value

    def identity_forward(*args, **kwargs):
        return returning(args[0] if args else kwargs["hidden_states"])

    try:
        for index in identity:
            layers[index].forward = identity_forward
        if replay is not None:
            state = replay[1]
            layers[replay[0]].forward = lambda *args, **kwargs: returning(state)
        yield
    finally:
        for index, forward in saved.items():
            if forward is None:
                layers[index].__dict__.pop("forward", None)
            else:
                layers[index].forward = forward


def _chunk_log_probs_kl(model, log_p: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
    """Per-row summed token KL ``[R·b]`` of dense log-probabilities ``[b, t, V]`` against the logits of student
    final hidden states ``[R·b, t, H]`` (R stacked copies of the b windows)."""
    log_q = F.log_softmax(head_logits(model, student_hidden).float(), dim=-1)
    repeats = student_hidden.shape[0] // log_p.shape[0]
    log_q = log_q.view(repeats, *log_p.shape)
    return (log_p.exp() * (log_p - log_q)).sum(dim=(-1, -2)).reshape(-1)


def log_probs_kl(model, teacher_log_probs: torch.Tensor, student_hidden: torch.Tensor, budget: int = 2**25
                 ) -> torch.Tensor:
    """Per-row mean token KL ``[R·b]`` of dense log-probabilities ``[b, T, V]`` (computed once) against the logits
    of student final hidden states ``[R·b, T, H]``, over chunks of at most ``budget`` logits; with gradients on,
    each chunk is recomputed in backward rather than kept."""
    rows, length = student_hidden.shape[:2]
    total = 0.0
    for part in position_chunks(rows, length, teacher_log_probs.shape[-1], budget):
        log_p = teacher_log_probs[:, part].to(student_hidden.device)
        total = total + recomputed(_chunk_log_probs_kl, model, log_p, student_hidden[:, part])
    return total / length


class ExactKL:
    """The exact hard-cut KL(dense ‖ cut), in nats per token, of candidate cuts on fixed calibration windows, with
    the work shared between candidates.

    The dense model runs once over the windows and keeps, within ``memory_budget`` bytes, its hidden state at the
    layer boundaries (all of them, or every k-th when they do not all fit) and its output log-probabilities (when
    they fit too; else its final hidden states, and the head is applied again per candidate). A candidate then
    runs only the layers it keeps after the last kept boundary at or before its first cut: the layers before a
    cut compute exactly what the dense model's do, and removed layers are skipped. Windows go ``pass_windows`` at a
    time. Models whose logits are more than their head of the final hidden states (see
    :func:`head_reproduces_logits`) are scored by :func:`hard_kl` instead.
    """

    def __init__(self, handle: Handle, windows: torch.Tensor, pass_windows: int = 16,
                 memory_budget: float = 4 * 2**30, chunked_head: bool | None = None):
        self.handle, self.windows = handle, windows
        model = handle.model
        self.chunked_head = head_reproduces_logits(model, windows[:1, :16]) if chunked_head is None else chunked_head
        self.passes = list(batches(windows, max(1, pass_windows)))
        self.boundaries: list[int] = []
        self.states: list[dict[int, torch.Tensor]] = []
        self.teacher: list[torch.Tensor] = []
        self.log_probs = False
        self.evaluated = 0
        if not self.chunked_head:
            return
        started = time.perf_counter()
        self._run_dense(memory_budget)
        self.dense_seconds = time.perf_counter() - started

    def _run_dense(self, memory_budget: float) -> None:
        model, layers = self.handle.model, self.handle.layers
        count, length = self.windows.shape
        hidden = int(text_config(model).hidden_size)
        element = next(model.parameters()).element_size()
        per_boundary = count * length * hidden * element
        room = max(0, int(memory_budget // per_boundary))
        stride = 1 if room >= len(layers) - 1 else max(1, -(-(len(layers) - 1) // max(room, 1)))
        self.boundaries = list(range(stride, len(layers), stride)) if room else []
        left = memory_budget - per_boundary * len(self.boundaries)
        self.log_probs = left >= count * length * vocab_size(model) * 4
        wanted = set(self.boundaries)
        captured: dict[int, torch.Tensor] = {}

        def capture(index: int):
            def hook(module, args, kwargs, output):
                out = output[0] if isinstance(output, tuple) else output
                self.tuple_output = isinstance(output, tuple)
                if index + 1 in wanted:
                    captured[index + 1] = out.detach()
            return hook

        self.tuple_output = False
        hooks = [layer.register_forward_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                for batch in self.passes:
                    captured.clear()
                    final = final_hidden(model, batch)
                    self.states.append(dict(captured))
                    self.teacher.append(self._log_probs(final) if self.log_probs else final)
        finally:
            for hook in hooks:
                hook.remove()

    def _log_probs(self, final: torch.Tensor, budget: int = 2**25) -> torch.Tensor:
        chunk = max(1, budget // (final.shape[0] * vocab_size(self.handle.model)))
        return torch.cat([F.log_softmax(head_logits(self.handle.model, final[:, start : start + chunk]).float(), -1)
                          for start in range(0, final.shape[1], chunk)], dim=1)

    def teacher_rows(self, indices: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The cached dense outputs (log-probabilities or final hidden states) of the windows ``indices`` ``[b]``,
        at ``positions`` ``[t]`` of each window when given: ``[b, t, V or H]``."""
        size = self.passes[0].shape[0]
        teacher = torch.stack([self.teacher[index // size][index % size] for index in indices.tolist()])
        return teacher if positions is None else teacher[:, positions.to(teacher.device)]

    def kl(self, teacher: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
        """Per-row mean token KL ``[R·b]`` of cached dense outputs ``[b, t, ·]`` against student final hidden states
        ``[R·b, t, H]`` (R stacked copies of the b windows)."""
        if self.log_probs:
            return log_probs_kl(self.handle.model, teacher, student_hidden)
        return head_kl(self.handle.model, teacher.to(student_hidden.device), student_hidden)

    def start(self, layer: int) -> int:
        """The last kept boundary at or before ``layer`` (0: run from the embeddings)."""
        return max((b for b in self.boundaries if b <= layer), default=0)

    def layers_run(self, candidate: Candidate) -> int:
        """Decoder layers one pass of ``candidate`` computes."""
        start, removed = self.start(candidate[0][0]), sum(e - s for s, e in candidate)
        return self.handle.num_layers - start - removed

    def dense_rows(self, boundary: int, indices: torch.Tensor, length: int) -> torch.Tensor:
        """The dense hidden state ``[b, length, H]`` entering layer ``boundary`` (a kept boundary) for the
        windows ``indices`` ``[b]``, at their first ``length`` positions (a causal model's state there does not
        depend on the later tokens)."""
        size = self.passes[0].shape[0]
        return torch.stack([self.states[index // size][boundary][index % size, :length]
                            for index in indices.tolist()])

    @contextlib.contextmanager
    def from_boundary(self, boundary: int, state: torch.Tensor | None, skipped: Collection[int] = ()):
        """Within the context, a forward pass starts at layer ``boundary`` from ``state`` (the layers before it
        return without computing) and skips the layers in ``skipped``."""
        replay = (boundary - 1, state) if boundary else None
        with replaced_layers(self.handle.layers, set(skipped) | set(range(max(boundary - 1, 0))), replay,
                             self.tuple_output):
            yield

    @torch.no_grad()
    def __call__(self, candidates: Sequence[Candidate], windows: int | None = None) -> list[float]:
        """Mean token KL of each candidate cut over the first ``windows`` calibration windows (all by default)."""
        count = self.windows.shape[0] if windows is None else max(1, min(windows, self.windows.shape[0]))
        if not self.chunked_head:
            return hard_kl(self.handle, self.windows[:count], candidates, max(len(self.passes[0]), 1),
                           chunked_head=False)
        model = self.handle.model
        found = []
        for candidate in candidates:
            removed = {i for s, e in candidate for i in range(s, e)}
            start = self.start(candidate[0][0]) if candidate else 0
            total, seen = 0.0, 0
            for index, batch in enumerate(self.passes):
                take = min(batch.shape[0], count - seen)
                if take <= 0:
                    break
                state = self.states[index][start][:take] if start else None
                with self.from_boundary(start, state, removed):
                    student = final_hidden(model, batch[:take])
                # summed where it was computed, in float64, and read back once for all candidates: reading each
                # pass's sum back would make the host wait for the GPU before it queues the next pass
                total = total + self.kl(self.teacher[index][:take], student).sum().double()
                seen += take
            found.append(total / count)
            self.evaluated += 1
        return [float(loss) for loss in torch.stack(found).cpu()] if found else []


def frozen(model) -> None:
    """End a training: no parameter of ``model`` requires grad, and none keeps a gradient (``requires_grad_(False)``
    alone leaves the last ``.grad`` of each trained parameter allocated; 0.44 GB a decoder layer at 8B)."""
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, options: HealOptions,
                   learning_rate: float) -> float:
    """One step of a heal's training on ``loss``; returns its value. A loss that is not finite stops the heal with
    a LayercutError before it changes any weight."""
    value = loss.item()
    if not math.isfinite(value):
        raise LayercutError(f"the {options.heal} heal diverged: its loss is {value} at step {step + 1} of "
                            f"{options.heal_steps} (learning rate {learning_rate:g}); lower --heal-lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value

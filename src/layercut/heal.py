"""The heal stage: after the cut, train a few parameters to bring the model back to the dense one.

:data:`HEALS` is the one registry of heals (cutoff endpoint tuning, the tail, LoRA on every layer); the CLI's
choices, the docs and the dispatch read it. A new heal is one entry naming the layers it trains.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from layercut import data, replacement
from layercut.forward import (
    batches,
    final_norm,
    frozen,
    head_logits,
    model_device,
    optimizer_step,
    position_chunks,
    recomputed,
    vocab_size,
)
from layercut.layers import Cut, Handle, Segment, kept_layers
from layercut.record import HealReport

if TYPE_CHECKING:
    from layercut.config import DataOptions, HealOptions

logger = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    """The dense model's top-k next-token log-probabilities, kept compactly on the CPU: ``[N, T, k]`` each."""

    log_probs: torch.Tensor
    indices: torch.Tensor


@torch.no_grad()
def teacher_targets(model, windows: torch.Tensor, top_k: int, batch_size: int = 4) -> TeacherTargets:
    """Top-``top_k`` log-probabilities of the (dense) model on ``windows`` ``[N, T]``, computed before the cut."""
    values, indices = [], []
    for batch in batches(windows, batch_size):
        logits = model(input_ids=batch.to(model_device(model)), use_cache=False).logits
        top = F.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        values.append(top.values.to(torch.bfloat16).cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    return TeacherTargets(torch.cat(values), torch.cat(indices))


def top_k_kl(student_logits: torch.Tensor, log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p ‖ q) where p is the teacher renormalised on its top-k tokens.

    ``student_logits`` ``[b, T, V]``; ``log_probs`` and ``indices`` ``[b, T, k]``.
    """
    p_log = F.log_softmax(log_probs.float(), dim=-1)
    q_log = F.log_softmax(student_logits.float(), dim=-1).gather(-1, indices.long())
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def chunked_top_k_kl(model, hidden: torch.Tensor, log_probs: torch.Tensor, indices: torch.Tensor,
                     budget: int = 2**24) -> torch.Tensor:
    """:func:`top_k_kl` of the output head on final ``hidden`` states ``[b, T, H]``, over chunks of positions of
    about ``budget`` logits, each recomputed in backward, so that the ``[b, T, V]`` logits never exist whole."""
    rows, length = hidden.shape[:2]

    def summed(states, values, picks):
        return top_k_kl(head_logits(model, states), values, picks) * states.shape[0] * states.shape[1]

    total = sum(recomputed(summed, hidden[:, part], log_probs[:, part], indices[:, part])
                for part in position_chunks(rows, length, vocab_size(model), budget))
    return total / (rows * length)


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` ``[b, T]``."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def endpoint_layers(segments: Sequence[Segment], total: int, per_side: int = 1) -> list[int]:
    """New (post-cut) indices of the ``per_side`` kept layers just before and just after each cut (fewer at an
    edge)."""
    keep = kept_layers(segments, total)
    chosen = set()
    for start, end in segments:
        before = [i for i in keep if i < start][-per_side:]
        after = [i for i in keep if i >= end][:per_side]
        chosen.update(keep.index(original) for original in before + after)
    return sorted(chosen)


def last_layers(segments: Sequence[Segment], total: int, count: int) -> list[int]:
    """New indices of the last ``count`` layers left after cutting ``segments`` out of ``total`` layers."""
    remaining = total - sum(end - start for start, end in segments)
    return list(range(max(0, remaining - count), remaining))


@dataclass(frozen=True)
class Heal:
    """A heal. A training heal names the post-cut layers it trains (from the cut segments, the layer count before
    the cut and the options), its default learning rate, its LoRA rank (0: full weights) and whether it also trains
    the final norm and an untied output head. A heal of its own kind may change which layers are cut (``cut``),
    gather what it needs from the dense model before the cut (``collect``), and heal in its own way (``apply``)."""

    help: str
    layers: Callable[[Sequence[Segment], int, HealOptions], list[int]] | None = None
    learning_rate: float | None = None
    lora_rank: int = 0
    tail: bool = False
    cut: Callable[[list[Segment]], list[Segment]] | None = None
    collect: Callable[..., Any] | None = None
    apply: Callable[..., HealReport] | None = None


# Learning rates measured best at equal steps on SmolLM2-135M (bench/results/repair-h200): two endpoint layers
# take a larger step than a full-depth update.
HEALS: dict[str, Heal] = {
    "none": Heal("no training after the cut", lambda segments, total, options: []),
    "endpoints": Heal("cutoff endpoint tuning: the layers just before and after each cut (--endpoint-layers on "
                      "each side; full weights, or LoRA with --lora-rank)",
                      lambda segments, total, options: endpoint_layers(segments, total, options.endpoint_layers), 1e-3),
    "last-k": Heal("the last --last-k layers, the final norm and an untied output head (Reassessing Layer Pruning: "
                   "--last-k 3)", lambda segments, total, options: last_layers(segments, total, options.last_k), 1e-4,
                   tail=True),
    "all": Heal("every remaining layer, full weights",
                lambda segments, total, options: last_layers(segments, total, total), 1e-4),
    "lora": Heal("LoRA adapters on every remaining layer, merged back into the weights",
                 lambda segments, total, options: last_layers(segments, total, total), 2e-4, lora_rank=8),
    "replaceme": Heal("ReplaceMe, training-free: a least-squares linear map from the MLP output of the layer before "
                      "each cut to the state leaving the cut (each token weighted by 1/|state|^2), folded into that "
                      "MLP's output projection",
                      collect=replacement.replaceme_collect, apply=replacement.fold_apply),
    "lsq": Heal("Ghosted Layers, training-free: the unweighted least-squares operator from the state entering each "
                "cut to the state leaving it, restricted to the identity plus a map of the last write before the cut "
                "(the MLP output of the layer before it), folded into that MLP's output projection",
                collect=replacement.lsq_collect, apply=replacement.fold_apply),
    "linearpatch": Heal("LinearPatch, training-free: a Hadamard rotation, a per-channel scaling by the ratio of "
                        "channel root mean squares across the cut, and the rotation back, applied to the MLP output "
                        "of the layer before each cut and folded into its output projection",
                        collect=replacement.linearpatch_collect, apply=replacement.fold_apply),
    "streamline": Heal("LLM-Streamline: each block is replaced by its first layer, trained (mean squared error) to "
                       "map the block's input to its output", learning_rate=replacement.STREAMLINE_LEARNING_RATE,
                       cut=replacement.streamline_cut,
                       collect=replacement.streamline_collect, apply=replacement.streamline_apply),
}

# The training-free linear patches, folded into the weights: each is a heal of its own and a starting point of a
# training heal (--heal-init).
PATCHES = ("lsq", "linearpatch", "replaceme")


@dataclass
class HealData:
    """The heal's training windows ``[N, T]``, for the kl loss the dense model's targets, and what a heal of its own
    kind collected from the dense model about the cut (:func:`before_cut`)."""

    windows: torch.Tensor
    teacher: TeacherTargets | None = None
    collected: Any = None


def planned_cut(segments: list[Segment], options: HealOptions) -> list[Segment]:
    """The segments to cut for the chosen ``segments``: the same, unless the heal keeps some of their layers."""
    spec = HEALS[options.heal]
    return spec.cut(segments) if spec.cut is not None else list(segments)


def before_cut(handle: Handle, segments: list[Segment], prepared: HealData | None, options: HealOptions
               ) -> HealData | None:
    """``prepared`` with what the heal needs from the dense model about the chosen ``segments`` (original indices);
    call before the cut, on the dense model."""
    spec = HEALS[options.heal if options.heal_init == "none" else options.heal_init]
    if prepared is None or spec.collect is None:
        return prepared
    return dataclasses.replace(prepared, collected=spec.collect(handle, segments, prepared, options))


def uses_teacher(options: HealOptions) -> bool:
    """Whether the heal trains on the dense model's top-k targets: a heal that trains (no patch or replacement of
    its own kind) with the kl loss. A heal that starts from a patch (``heal_init``) still trains."""
    return options.heal != "none" and HEALS[options.heal].apply is None and options.heal_loss == "kl"


def prepare(handle: Handle, options: HealOptions, data_options: DataOptions) -> HealData | None:
    """Training windows from the calibration text (seed + 1, so they differ from the search windows) and, when the
    heal trains on them with the kl loss (:func:`uses_teacher`), the dense model's top-k targets; call before the
    cut. None when the heal reads no data. A training-free patch fits on the same windows, without the targets."""
    if options.heal == "none":
        return None
    text = data.load_text(data_options.calib, "calib")
    windows = data.calibration_windows(handle.tokenizer, text, data_options.seq_len, options.heal_windows,
                                       data_options.seed + 1)
    teacher = None
    if uses_teacher(options):
        teacher = teacher_targets(handle.model, windows, options.heal_top_k, data_options.batch_size)
    return HealData(windows, teacher)


def _is_linear(module: torch.nn.Module) -> bool:
    """A projection peft can adapt: ``nn.Linear`` or transformers' GPT-2 style ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _tail_modules(model) -> list[torch.nn.Module]:
    """The final norm and (untied) lm_head, which the last-k recipe trains too."""
    modules = []
    norm = final_norm(model)
    if norm is not None:
        modules.append(norm)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        logger.info("lm_head is tied to the input embedding: it stays frozen so the embedding does not change")
    elif head is not None:
        modules.append(head)
    return modules


def heal(handle: Handle, cut: Cut, prepared: HealData | None, options: HealOptions, seed: int = 0,
         progress=None) -> HealReport:
    """Train the layers ``options.heal`` names on the prepared windows after ``cut``; return the report.

    The loss is the top-k KL to the dense teacher (``heal_loss=kl``) or the LM loss. With a LoRA rank (``lora``
    always, ``--lora-rank`` otherwise) peft LoRA adapters are trained and merged back, so the handle's model
    stays a plain model. With ``heal_init``, that patch is folded in first and the training starts from it.
    ``progress`` (optional) is called with 1 after each step.
    """
    if options.heal == "none" or options.heal_steps <= 0:
        return HealReport(name="none")
    spec = HEALS[options.heal]
    if spec.apply is not None:
        return spec.apply(handle, cut, prepared, options, seed, progress)
    if options.heal_loss == "kl" and prepared.teacher is None:
        raise ValueError("heal_loss=kl needs the dense model's teacher targets")
    if options.heal_init != "none":
        replacement.fold_apply(handle, cut, prepared, options, name=options.heal_init)
    started = time.perf_counter()
    indices = spec.layers(cut.segments, cut.layers_before, options)
    rank = options.lora_rank or spec.lora_rank
    model = trainable_model(handle, indices, rank, spec.tail)
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    logger.info("healing (%s): training %d parameters in layers %s", options.heal, count, indices)
    learning_rate = spec.learning_rate if options.heal_lr is None else options.heal_lr
    losses = train(model, trainable, prepared, options, learning_rate, seed, progress)
    if rank:
        model = model.merge_and_unload()
    frozen(model)
    model.eval()
    handle.model = model
    return HealReport(name=options.heal, layers=indices, lora_rank=rank, trainable_parameters=count,
                      learning_rate=learning_rate, steps=options.heal_steps, loss=options.heal_loss,
                      first_loss=losses[0], last_loss=sum(losses[-10:]) / len(losses[-10:]),
                      seconds=time.perf_counter() - started)


def trainable_model(handle: Handle, indices: list[int], rank: int, tail: bool):
    """The handle's model with only the layers ``indices`` (post-cut) trainable: their full weights, with the final
    norm and an untied output head when ``tail``, or, with a LoRA ``rank``, peft adapters on their projections
    (the peft model is returned; :meth:`merge_and_unload` gives the plain model back)."""
    model, layers = handle.model, handle.layers
    model.requires_grad_(False)
    if rank:
        from peft import LoraConfig, get_peft_model

        targets = sorted({child.rsplit(".", 1)[-1] for index in indices
                          for child, module in layers[index].named_modules() if _is_linear(module)})
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                            layers_to_transform=indices, layers_pattern=handle.layers_name.rsplit(".", 1)[-1])
        return get_peft_model(model, config)
    for index in indices:
        layers[index].requires_grad_(True)
    if tail:
        for module in _tail_modules(model):
            module.requires_grad_(True)
    return model


def train(model, trainable: list[torch.nn.Parameter], prepared: HealData, options: HealOptions,
          learning_rate: float, seed: int = 0, progress=None) -> list[float]:
    """``options.heal_steps`` AdamW steps on ``trainable``, each on ``options.heal_batch`` training windows drawn
    by a generator seeded with ``seed``; the loss of each step."""
    windows, teacher = prepared.windows, prepared.teacher
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    losses = []
    for step in range(options.heal_steps):
        picks = torch.randint(0, windows.shape[0], (min(options.heal_batch, windows.shape[0]),), generator=generator)
        batch = windows[picks].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        if options.heal_loss == "kl":
            loss = top_k_kl(logits, teacher.log_probs[picks].to(device), teacher.indices[picks].to(device))
        else:
            loss = lm_loss(logits, batch)
        losses.append(optimizer_step(optimizer, loss, step, options, learning_rate))
        if progress is not None:
            progress(1)
    return losses

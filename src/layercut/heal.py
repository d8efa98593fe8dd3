"""Repair a cut model: cutoff endpoint tuning (the layers beside each cut) and the other healing recipes."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layercut.config import HealOptions
from layercut.evaluate import batches
from layercut.layers import Segment, find_decoder_layers, kept_layers
from layercut.load import model_device

logger = logging.getLogger(__name__)

# Learning rates measured best at equal steps on SmolLM2-135M (bench/results/repair-h200): two endpoint layers
# take a larger step than a full-depth update.
DEFAULT_LEARNING_RATES = {"endpoints": 1e-3, "last-k": 1e-4, "lora": 2e-4}


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


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` ``[b, T]``."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def endpoint_layers(segments: Sequence[Segment], total: int) -> list[int]:
    """New (post-cut) indices of the layers just before and just after each cut; one at an edge."""
    keep = kept_layers(segments, total)
    chosen = set()
    for start, end in segments:
        for original in (start - 1, end):
            if original in keep:
                chosen.add(keep.index(original))
    return sorted(chosen)


def layers_to_train(method: str, segments: Sequence[Segment], total: int, last_k: int) -> list[int]:
    """Post-cut indices of the decoder layers a recipe trains (``lora`` and ``none``: see :func:`heal`)."""
    remaining = total - sum(end - start for start, end in segments)
    if method == "endpoints":
        return endpoint_layers(segments, total)
    if method == "last-k":
        return list(range(max(0, remaining - last_k), remaining))
    if method == "lora":
        return list(range(remaining))
    return []


def _is_linear(module: torch.nn.Module) -> bool:
    """A projection peft can adapt: ``nn.Linear`` or transformers' GPT-2 style ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _tail_modules(model) -> list[torch.nn.Module]:
    """The final norm and (untied) lm_head, which the last-k recipe trains too."""
    modules = []
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = next((getattr(base, name) for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm")
                 if base is not None and isinstance(getattr(base, name, None), torch.nn.Module)), None)
    if norm is not None:
        modules.append(norm)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        logger.info("lm_head is tied to the input embedding: it stays frozen so the embedding does not change")
    elif head is not None:
        modules.append(head)
    return modules


def heal(model, windows: torch.Tensor, segments: Sequence[Segment], total: int, options: HealOptions,
         teacher: TeacherTargets | None = None, seed: int = 0, layers_path: str | None = None,
         progress=None) -> tuple[torch.nn.Module, dict]:
    """Train the layers a recipe names on ``windows`` ``[N, T]`` after the cut; return ``(model, report)``.

    ``total`` is the layer count before the cut and ``segments`` the removed ones (original indices). The loss is
    the top-k KL to ``teacher`` (``heal_loss=kl``) or the LM loss. With ``lora_rank > 0`` (always for the
    ``lora`` recipe) peft LoRA adapters are trained and merged back, so the result is a plain model.
    """
    if options.heal == "none" or options.heal_steps <= 0:
        return model, {"recipe": "none", "trainable_parameters": 0, "seconds": 0.0, "steps": 0}
    if options.heal_loss == "kl" and teacher is None:
        raise ValueError("heal_loss=kl needs the dense model's teacher targets")
    started = time.perf_counter()
    indices = layers_to_train(options.heal, segments, total, options.last_k)
    name, layers = find_decoder_layers(model, layers_path)
    rank = options.lora_rank or (8 if options.heal == "lora" else 0)
    model.requires_grad_(False)
    if rank:
        from peft import LoraConfig, get_peft_model

        targets = sorted({child.rsplit(".", 1)[-1] for index in indices
                          for child, module in layers[index].named_modules() if _is_linear(module)})
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                            layers_to_transform=indices, layers_pattern=name.rsplit(".", 1)[-1])
        model = get_peft_model(model, config)
    else:
        for index in indices:
            layers[index].requires_grad_(True)
        if options.heal == "last-k":
            for module in _tail_modules(model):
                module.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    logger.info("healing (%s): training %d parameters in layers %s", options.heal, count, indices)
    learning_rate = options.heal_lr or DEFAULT_LEARNING_RATES[options.heal]
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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(1)
    del optimizer
    if rank:
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    report = {"recipe": options.heal, "layers": indices, "lora_rank": rank, "trainable_parameters": count,
              "learning_rate": learning_rate, "steps": options.heal_steps, "loss": options.heal_loss,
              "first_loss": losses[0],
              "last_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - started}
    return model, report

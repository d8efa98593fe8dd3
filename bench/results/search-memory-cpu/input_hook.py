"""The cost of the input-embedding hook that transformers' ``gradient_checkpointing_enable`` leaves behind (it makes
the embeddings' output require grad, so every backward runs down through every layer): the endpoint heal of a tail
cut on a random-init SmolLM2-shaped Llama (CPU, float32), timed with the hook as a checkpointed search left it
before commit that removes it, and without. Run from the repository root:

    PYTHONPATH=src python bench/results/search-memory-cpu/input_hook.py
"""
import copy
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from layercut.config import HealOptions
from layercut.heal import HealData, heal, teacher_targets
from layercut.layers import Handle, cut

config = AutoConfig.for_model(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                              max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0)
windows = torch.randint(0, 49152, (16, 128))
options = HealOptions(heal="endpoints", heal_steps=20, heal_batch=4)
for hooked in (False, True, False, True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()  # a cut edits its config
    teacher = teacher_targets(model, windows, top_k=64)
    if hooked:
        model.enable_input_require_grads()  # the state a checkpointed search left before the fix
    handle = Handle.of(model)
    removed = cut(handle, [(24, 30)])  # the tail cut: the heal trains the last kept layer only
    started = time.perf_counter()
    report = heal(handle, removed, HealData(windows, teacher), options)
    print(f"hook {'on ' if hooked else 'off'}: heal {time.perf_counter() - started:.1f} s, "
          f"last loss {report.last_loss:.6f}", flush=True)

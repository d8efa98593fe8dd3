"""The search's result (cut, KL, trajectory, landscape) and seconds on the small Llama shape of profile_search.py, to
compare two source trees: ``PYTHONPATH=src python bench/results/search-memory-cpu/compare_search.py clp 32``."""
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from layercut import selection
from layercut.config import SearchOptions
from layercut.layers import Handle

method, N = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
cfg = AutoConfig.for_model(model_type="llama", hidden_size=256, intermediate_size=896, num_hidden_layers=32,
    num_attention_heads=4, num_key_value_heads=1, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
windows = torch.randint(0, 128256, (N, 256))
extra = {"segments": 1, "repair_candidates": 4, "repair_finalists": 1} if method == "repair" else {}
t = time.time()
f = selection.search(Handle.of(model), windows, SearchOptions(method=method, remove=8, **extra), 4, 0)
print(json.dumps({"s": time.time() - t, "segments": f.segments, "kl": f.kl, "trajectory": f.trajectory, "landscape": f.landscape}))

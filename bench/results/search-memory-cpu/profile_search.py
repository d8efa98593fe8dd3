"""Profile the search's allocations on a small Llama shape (CPU, bf16): the live bytes of every allocation during
``selection.search`` (torch.profiler's memory events), their peak over the weights, and the peak and rise inside each
marked stage. README.md says what was run:

    PYTHONPATH=src python bench/results/search-memory-cpu/profile_search.py --method repair --windows 128 \
        --opts '{"segments": 1, "repair_candidates": 4, "repair_finalists": 1}'
"""
import argparse
import functools
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoConfig, AutoModelForCausalLM

from layercut import forward, gate, repair, selection
from layercut.config import SearchOptions
from layercut.layers import Handle

p = argparse.ArgumentParser()
p.add_argument("--method", default="clp"); p.add_argument("--hidden", type=int, default=256)
p.add_argument("--inter", type=int, default=896); p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv", type=int, default=1); p.add_argument("--layers", type=int, default=32)
p.add_argument("--vocab", type=int, default=128256); p.add_argument("--windows", type=int, default=32)
p.add_argument("--seq", type=int, default=256); p.add_argument("--remove", type=int, default=8)
p.add_argument("--opts", default="{}")
a = p.parse_args()
torch.manual_seed(0)
cfg = AutoConfig.for_model(model_type="llama", hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
    num_attention_heads=a.heads, num_key_value_heads=a.kv, vocab_size=a.vocab, max_position_embeddings=8192,
    rope_theta=500000.0, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
handle = Handle.of(model)
windows = torch.randint(0, a.vocab, (a.windows, a.seq))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
opts = SearchOptions(method=a.method, remove=a.remove, **json.loads(a.opts))

def mark(mod, name, label=None):
    f = getattr(mod, name)
    @functools.wraps(f)
    def w(*x, **k):
        with record_function("PH:" + (label or name)):
            return f(*x, **k)
    setattr(mod, name, w)
mark(forward.ExactKL, "_run_dense"); mark(forward.ExactKL, "__call__", "exact_call")
mark(gate, "notch_step"); mark(repair, "short_heal"); mark(repair, "held_out_kl"); mark(repair, "repair_data")
mark(repair, "restored")  # context manager creation only
mark(gate, "search_notches")
# make short_heal/notch_step visible to callers that imported them by name
t0 = time.time()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    found = selection.search(handle, windows, opts, 4, 0)
print("cut", found.segments, "kl", found.kl, "s", round(time.time() - t0, 1), file=sys.stderr)
ev = prof.profiler.kineto_results.events()
mem = sorted((e.start_ns(), e.nbytes()) for e in ev if e.name() == "[memory]")
phases = [(e.name()[3:], e.start_ns(), e.end_ns()) for e in ev if e.name().startswith("PH:")]
live, peak, peak_t = 0, 0, 0
curve = []
for t, n in mem:
    live += n
    curve.append((t, live))
    if live > peak:
        peak, peak_t = live, t
print(json.dumps({"weights_MB": weights / 1e6, "peak_extra_MB": peak / 1e6, "ratio": (weights + peak) / weights,
                  "end_live_MB": live / 1e6}))
print("peak in phases:", [n for n, s, e in phases if s <= peak_t <= e])
agg = {}
for name, s, e in phases:
    inside = [l for t, l in curve if s <= t <= e]
    before = max([l for t, l in curve if t < s] [-1:] or [0])
    if inside:
        m = agg.setdefault(name, [0, 0, 1e18, 0])
        m[0] += 1; m[1] = max(m[1], max(inside)); m[2] = min(m[2], before); m[3] = max(m[3], max(inside) - before)
for k, (c, mx, b, d) in agg.items():
    print(f"{k:14s} n={c:3d} peak_live={mx/1e6:9.1f}MB min_live_at_entry={b/1e6:9.1f}MB max_rise_within={d/1e6:9.1f}MB")

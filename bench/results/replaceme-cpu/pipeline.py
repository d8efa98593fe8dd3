"""replaceme through layercut's own heal stage (as bench/grid.py runs it), SmolLM2-135M in float32 on the CPU:
wiki test perplexity (128 windows of 256 tokens) after the fit on 128 calibration windows, for the CLP cuts at
n = 10 and n = 6, and with no heal. Writes a JSON line per cut to stdout."""
import copy
import json
import sys
import time

import torch

from layercut import heal
from layercut.config import DataOptions, HealOptions, ModelOptions
from layercut.data import evaluation_windows, load_text
from layercut.evaluate import perplexity
from layercut.layers import cut
from layercut.load import load_model

torch.set_num_threads(2)
dense = load_model("smollm2-135m", ModelOptions(dtype="float32"))
test = evaluation_windows(dense.tokenizer, load_text("wiki", "test"), 256, 128)
options = HealOptions(heal="replaceme", heal_windows=128, heal_loss="lm")
prepared = heal.prepare(dense, options, DataOptions(seq_len=256, seed=0, batch_size=8))
for segments in ([(9, 19)], [(13, 19)]):
    started = time.time()
    collected = heal.before_cut(dense, segments, prepared, options)
    pruned = copy.deepcopy(dense)
    removed = cut(pruned, heal.planned_cut(segments, options))
    heal.heal(pruned, removed, collected, options, 0)
    seconds = time.time() - started
    plain = copy.deepcopy(dense)
    cut(plain, segments)
    with torch.no_grad():
        row = {"code": sys.argv[1] if len(sys.argv) > 1 else "", "cut": segments,
               "replaceme": perplexity(pruned.model, test, 8), "no_heal": perplexity(plain.model, test, 8),
               "fit_seconds": seconds}
    print(json.dumps(row), flush=True)

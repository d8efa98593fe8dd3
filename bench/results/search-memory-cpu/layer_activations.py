"""Live bytes kept after the gated forward (what autograd holds for backward), by profiler memory events, per token
and layer, against 16H + 4K + 6I bytes: ``python layer_activations.py H I HEADS KV_HEADS LAYERS ROWS TOKENS``
(the 8B layer: 4096 14336 32 8 2 1 256)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

from layercut.forward import final_hidden, gated

H, I, NH, KV, L, rows, T = map(int, sys.argv[1:8])
cfg = AutoConfig.for_model(model_type="llama", hidden_size=H, intermediate_size=I, num_hidden_layers=L,
    num_attention_heads=NH, num_key_value_heads=KV, vocab_size=1024, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
ids = torch.randint(0, 1024, (rows, T))
res = {}
for grad in (True, False):
    gates = torch.full((1, L), 0.5, requires_grad=grad)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, gated(model.model.layers) as s:
        s(gates)
        out = final_hidden(model, ids)
        keep = out
    live = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    res[grad] = live - out.numel()*out.element_size(); del keep, out
tok = rows * T
k = H // NH * KV
print(f"H={H} I={I} L={L} tokens={tok}: kept {res[True]/1e6:.1f} MB (no-grad {res[False]/1e6:.1f}) = "
      f"{res[True]/tok/L:.0f} B/token/layer; formula 16H+4K+6I = {16*H+4*k+6*I}")

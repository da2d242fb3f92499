"""The forgetting gate's attention at L = 2048, forward + backward: the fused per-key-bias path
(posemb.model.key_bias_attention) against the tiled content path it replaced, plain causal SDPA
(the NoPE floor) and a float64 reference, with strong forgetting (gate bias 1: f ~ 0.73).

    python bench/forgetting_fused_probe.py [threads]
"""
import sys
import time

import torch
import torch.nn.functional as F

from posemb import build
from posemb.model import attention
from posemb.model.attention import attend

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
B, H, L, d = 1, 4, 2048, 64
scheme = build("forgetting", head_dim=d, num_heads=H)
with torch.no_grad():
    scheme.gate_bias.fill_(1.0)
    scheme.gate_weight.normal_(0, 0.2)
q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
pos = torch.arange(L).expand(B, -1)
leaves = [q, k, v, scheme.gate_weight, scheme.gate_bias]
cotangent = torch.randn(B, H, L, d)


def reference64():
    q64, k64, v64 = q.double(), k.double(), v.double()
    c = torch.cumsum(F.logsigmoid(torch.einsum("bhld,hd->bhl", k64, scheme.gate_weight.double())
                                  + scheme.gate_bias.double()[:, None]), -1)
    s = q64 @ k64.transpose(-1, -2) / d ** 0.5 + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v64


def run(fn):
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = fn()
        grads = torch.autograd.grad((out * cotangent).sum(), leaves, allow_unused=True)
        best = min(best, time.perf_counter() - start)
    return best, out, grads


_, ref, ref_grads = run(reference64)


def library(fused):
    def call():
        attention._KEY_BIAS_FUSED = fused
        try:
            return attend(q, k, v, scheme, pos, pos, causal=True)
        finally:
            attention._KEY_BIAS_FUSED = True
    return call


for name, fn in [("tiled content path", library(False)), ("fused per-key bias", library(True)),
                 ("plain causal SDPA (NoPE)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))]:
    seconds, out, grads = run(fn)
    line = f"{name:26s} fwd+bwd {seconds * 1e3:7.1f} ms"
    if "NoPE" not in name:
        errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads)]
        line += (f"   max|out - float64| {(out.double() - ref).abs().max().item():.1e}   grad rel err q k v w b "
                 + " ".join(f"{e:.1e}" for e in errors))
    print(line)

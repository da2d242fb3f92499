"""One training step at 2048 tokens (the step table's model), forgetting gate fused vs tiled vs NoPE, 2 threads:
    python bench/forgetting_step_probe.py
"""
import time, torch
from posemb.model import TransformerLM, attention
torch.set_num_threads(2); torch.manual_seed(0)
def step_ms(scheme, fused=True):
    attention._KEY_BIAS_FUSED = fused
    m = TransformerLM(vocab_size=256, dim=256, depth=2, heads=4, scheme=scheme)
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randint(0, 256, (1, 2049))
    ts = []
    for _ in range(4):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter() - t)
    attention._KEY_BIAS_FUSED = True
    return sorted(ts[1:])[1] * 1e3
n = step_ms("nope"); f = step_ms("forgetting"); t = step_ms("forgetting", False); n2 = step_ms("nope")
print(f"nope {n:.0f}/{n2:.0f} ms  forgetting fused {f:.0f} ms ({f/((n+n2)/2):.2f}x)  tiled {t:.0f} ms ({t/((n+n2)/2):.2f}x)")

"""One training step at 2048 tokens (the step table's model) for Shaw and DeBERTa: the far-field path at
several band sizes, the tiled path, and NoPE, 2 threads:
    python bench/far_field_step_probe.py [band rows ...]
"""
import sys
import time

import torch

from posemb.model import TransformerLM, attention
from posemb.model import far_field_attention as far_field

torch.set_num_threads(2)


def step_ms(scheme, fused=True, band=None):
    torch.manual_seed(0)
    attention._FAR_FIELD_FUSED = fused
    if band is not None:
        far_field.BAND_ROWS = band
    model = TransformerLM(vocab_size=256, dim=256, depth=2, heads=4, scheme=scheme)
    opt = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 256, (1, 2049))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    attention._FAR_FIELD_FUSED = True
    return sorted(times[1:])[1] * 1e3


bands = [int(b) for b in sys.argv[1:]] or [far_field.BAND_ROWS]
default = far_field.BAND_ROWS
nope = step_ms("nope")
for scheme in ("shaw", "deberta"):
    model = TransformerLM(vocab_size=256, dim=256, depth=2, heads=4, scheme=scheme)
    reach = next(m.far_reach() for m in model.modules() if hasattr(m, "far_reach") and m.far_reach() is not None)
    line = [f"{scheme} (reach {reach}):"]
    for band in bands:
        ms = step_ms(scheme, band=band)
        line.append(f"band {band} {ms:.0f} ms ({ms / nope:.2f}x)")
    far_field.BAND_ROWS = default
    tiled = step_ms(scheme, fused=False)
    line.append(f"tiled {tiled:.0f} ms ({tiled / nope:.2f}x)")
    print("  ".join(line), flush=True)
print(f"nope {nope:.0f} ms, again {step_ms('nope'):.0f} ms")

"""DeBERTa's strided views against its gathers (posemb.schemes.deberta._TOEPLITZ), one process, the two
interleaved (docs/performance.md, "Round four"):
    .venv/bin/python bench/study/deberta_views.py THREADS study   # study shape: 32 x 128 bytes, quick model
    .venv/bin/python bench/study/deberta_views.py THREADS step    # the step section's 1 x 2048, dim 256, depth 2
Prints the median training step (ms) with the views (True) and with the gathers (False)."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import posemb
from posemb.lab.data import RandomWindows
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer
from posemb.schemes import deberta

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
shape = sys.argv[2] if len(sys.argv) > 2 else "study"


def stepper():
    if shape == "study":
        data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        batches = RandomWindows(data, 128, 32, 0)
        model = build_model("deberta", ModelConfig(), 128, seed=0)
        optimizer = make_optimizer(model, TrainConfig(steps=300))
    else:
        tokens = torch.randint(0, 256, (1, 2049), generator=torch.Generator().manual_seed(0))
        batches = lambda step: (tokens[:, :-1], tokens[:, 1:])  # noqa: E731
        torch.manual_seed(0)
        model = posemb.TransformerLM(256, dim=256, depth=2, heads=4, scheme="deberta")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    count = [0]

    def step():
        x, y = batches(count[0])
        count[0] += 1
        loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


steps = {flag: stepper() for flag in (True, False)}
times = {flag: [] for flag in steps}
for flag, step in steps.items():
    deberta._TOEPLITZ = flag
    step(), step()
for _ in range(8):
    for flag, step in steps.items():
        deberta._TOEPLITZ = flag
        start = time.perf_counter()
        step()
        times[flag].append(time.perf_counter() - start)
deberta._TOEPLITZ = True
print(shape, {("views" if flag else "gathers"): round(statistics.median(t) * 1e3, 1) for flag, t in times.items()})

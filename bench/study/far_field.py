"""Study-shape training step (docs/study.md's quick profile: 32 x 128 bytes) of Shaw and DeBERTa on the
far-field path against the tiled path, interleaved in one process; and the evaluation forward at 2048:
    .venv/bin/python bench/study/far_field.py THREADS
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from posemb.lab.data import RandomWindows
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer
from posemb.model import attention

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
batches = RandomWindows(data, 128, 32, 0)


def stepper(scheme):
    model = build_model(scheme, ModelConfig(), 128, seed=0)
    model.train()
    opt = make_optimizer(model, TrainConfig(steps=300))
    count = [0]

    def step():
        x, y = batches(count[0])
        loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count[0] += 1
    return model, step


def timed(fn, fused):
    attention._FAR_FIELD_FUSED = fused
    start = time.perf_counter()
    fn()
    attention._FAR_FIELD_FUSED = True
    return time.perf_counter() - start


for scheme in ("shaw", "deberta", "nope"):
    runs = {fused: stepper(scheme) for fused in (True, False)}
    for fused, (_, step) in runs.items():
        timed(step, fused), timed(step, fused)
    times = {True: [], False: []}
    for _ in range(6):
        for fused, (_, step) in runs.items():
            times[fused].append(timed(step, fused))
    model = runs[True][0].eval()
    x = torch.randint(0, 256, (4, 2048))
    with torch.inference_mode():
        evals = {fused: min(timed(lambda: model(x), fused) for _ in range(2)) for fused in (True, False)}
    fused_ms, tiled_ms = (statistics.median(times[f]) * 1e3 for f in (True, False))
    print(f"{scheme}: train step fused {fused_ms:.0f} ms, tiled {tiled_ms:.0f} ms ({fused_ms / tiled_ms:.2f}x); "
          f"eval 4 x 2048 fused {evals[True] * 1e3:.0f} ms, tiled {evals[False] * 1e3:.0f} ms", flush=True)

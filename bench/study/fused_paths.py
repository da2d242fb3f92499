"""Study-shape training step (quick profile: 32 x 128 bytes, dim 128, depth 3, 4 heads) and evaluation forward
(4 x 2048 bytes) of each content scheme on its fused path against the tiled content path (the module flag
in posemb.model.attention set to False), one process, the two interleaved:
    .venv/bin/python bench/study/fused_paths.py [THREADS] [SCHEME ...]
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from posemb.lab.data import RandomWindows
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer
from posemb.model import attention

FLAGS = {"fire": "_FIRE_FUSED", "cope": "_COPE_FUSED", "transformer_xl": "_RELATIVE_KEYS_FUSED",
         "forgetting": "_KEY_BIAS_FUSED", "shaw": "_FAR_FIELD_FUSED", "deberta": "_FAR_FIELD_FUSED"}
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
batches = RandomWindows(data, 128, 32, 0)


def stepper(scheme):
    model = build_model(scheme, ModelConfig(), 128, seed=0)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(steps=300))
    count = [0]

    def step():
        x, y = batches(count[0])
        loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count[0] += 1
    return model, step


def timed(flag, fused, function):
    setattr(attention, flag, fused)
    start = time.perf_counter()
    function()
    setattr(attention, flag, True)
    return time.perf_counter() - start


for scheme in sys.argv[2:] or list(FLAGS):
    flag = FLAGS[scheme]
    runs = {fused: stepper(scheme) for fused in (True, False)}
    for fused, (_, step) in runs.items():
        timed(flag, fused, step), timed(flag, fused, step)
    times = {True: [], False: []}
    for _ in range(6):
        for fused, (_, step) in runs.items():
            times[fused].append(timed(flag, fused, step))
    model = runs[True][0].eval()
    x = torch.randint(0, 256, (4, 2048))
    with torch.inference_mode():
        evals = {fused: min(timed(flag, fused, lambda: model(x)) for _ in range(2)) for fused in (True, False)}
    fused_ms, tiled_ms = (statistics.median(times[f]) * 1e3 for f in (True, False))
    print(f"{scheme}: train step fused {fused_ms:.0f} ms, tiled {tiled_ms:.0f} ms ({fused_ms / tiled_ms:.2f}x); "
          f"eval 4 x 2048 fused {evals[True] * 1e3:.0f} ms, tiled {evals[False] * 1e3:.0f} ms "
          f"({evals[True] / evals[False]:.2f}x)", flush=True)

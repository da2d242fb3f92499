"""Study-shape training steps of one process per call (docs/study.md, "Parallel runs"): run it once with
2 threads, then twice at the same time with 1 thread, and compare steps per second:
    .venv/bin/python bench/study/parallel_steps.py 2 nope,rope,deberta,shaw
    (.venv/bin/python bench/study/parallel_steps.py 1 nope,rope,deberta,shaw &
     .venv/bin/python bench/study/parallel_steps.py 1 nope,rope,deberta,shaw; wait)
Prints each scheme's median step (ms) over 10 steps after 2."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from posemb.lab.data import RandomWindows
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer

torch.set_num_threads(int(sys.argv[1]))
data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
batches = RandomWindows(data, 128, 32, 0)
results = []
for scheme in sys.argv[2].split(","):
    model = build_model(scheme, ModelConfig(), 128, seed=0)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(steps=300))
    count = [0]

    def step():
        x, y = batches(count[0])
        count[0] += 1
        loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    step(), step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    results.append(f"{scheme} {statistics.median(times) * 1e3:.1f}")
print(f"threads {sys.argv[1]}:", " ".join(results))

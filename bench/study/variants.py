"""Study-speed probe (docs/study.md, 'On the Intel Xeon'): run as .venv/bin/python bench/study/variants.py ARGS from the project root."""
import sys, time, torch, statistics
import torch.nn.functional as F
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer, lr_at
from posemb.lab.data import RandomWindows
threads = int(sys.argv[1]); torch.set_num_threads(threads)
schemes = sys.argv[2].split(",")
cfg = TrainConfig(steps=300); mc = ModelConfig()
data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
batches = RandomWindows(data, 128, 32, 0)
def make(scheme, mode):
    model = build_model(scheme, mc, 128, seed=0); model.train()
    opt = make_optimizer(model, cfg)
    if mode == "foreach":
        for g in opt.param_groups: g["foreach"] = True
    fwd = model
    if mode == "compile":
        fwd = torch.compile(model)
    amp = mode == "bf16"
    s = [0]
    def step():
        x, y = batches(s[0])
        for g in opt.param_groups: g["lr"] = lr_at(s[0], cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        v = float(loss.detach())
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); s[0] += 1
        return v
    return model, step
for scheme in schemes:
    modes = ["base", "foreach", "bf16"] + (["compile"] if "compile" in sys.argv else [])
    runs = {}
    for m in modes:
        t = time.perf_counter(); model, step = make(scheme, m); step(); runs[m] = (model, step)
        first = time.perf_counter() - t
        if m == "compile": print(f"{scheme}: compile first step {first:.1f} s")
    times = {m: [] for m in modes}; losses = {m: [] for m in modes}
    for r in range(12):
        for m in modes:
            t = time.perf_counter(); losses[m].append(runs[m][1]()); times[m].append(time.perf_counter() - t)
    base = statistics.median(times["base"][2:])
    out = []
    for m in modes:
        med = statistics.median(times[m][2:])
        same = all(a == b for a, b in zip(losses[m], losses["base"]))
        wsame = all(torch.equal(a, b) for a, b in zip(runs[m][0].parameters(), runs["base"][0].parameters()))
        out.append(f"{m} {med*1e3:.0f} ms ({4096/med:,.0f} tok/s, x{base/med:.2f}, losses same {same}, weights same {wsame}, last loss {losses[m][-1]:.5f})")
    print(f"{scheme} threads {threads}: " + "; ".join(out), flush=True)

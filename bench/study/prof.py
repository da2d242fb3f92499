"""Study-speed probe (docs/study.md, 'On the Intel Xeon'): run as .venv/bin/python bench/study/prof.py ARGS from the project root."""
import sys, time, torch, collections
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer, lr_at
threads = int(sys.argv[1]); torch.set_num_threads(threads)
cfg = TrainConfig(steps=300); mc = ModelConfig()
g = torch.Generator().manual_seed(0)
data = torch.randint(0, 256, (200000,), generator=g, dtype=torch.uint8)
from posemb.lab.data import RandomWindows
batches = RandomWindows(data, 128, 32, 0)
def cat(name):
    n = name.lower()
    if any(k in n for k in ("mm", "matmul", "linear", "addmm", "bmm", "scaled_dot", "_flash")): return "matmul/attn-kernel"
    if "adam" in n or "_foreach" in n or "lerp" in n or "addcdiv" in n or "addcmul" in n: return "optimizer"
    if "norm" in n and "layer" not in n: return "clip/norm"
    if "cross_entropy" in n or "log_softmax" in n or "nll" in n: return "loss"
    if "randint" in n or "index" in n or "generator" in n: return "data"
    if "item" in n or "_local_scalar" in n or "tolist" in n: return "host sync"
    return "other elementwise/view"
for scheme in ("nope", "rope"):
    model = build_model(scheme, mc, 128, seed=0); opt = make_optimizer(model, cfg); model.train()
    def step(s):
        x, y = batches(s)
        for gr in opt.param_groups: gr["lr"] = lr_at(s, cfg)
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        v = float(loss.detach())
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    for s in range(5): step(s)
    t = time.perf_counter(); [step(s) for s in range(5, 15)]; wall = (time.perf_counter() - t) / 10
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for s in range(15, 20): step(s)
    tot = collections.Counter()
    ka = p.key_averages()
    # self CPU time by aten op category
    for e in ka:
        if e.key.startswith("aten::") or e.key.startswith("Optimizer") is False:
            pass
    selft = {e.key: e.self_cpu_time_total for e in ka}
    for k, v in selft.items(): tot[cat(k) if not k.startswith("Optimizer.step") else "optimizer"] += v
    allself = sum(selft.values())
    print(f"== {scheme} threads {threads}: train step {wall*1e3:.1f} ms = {32*128/wall:,.0f} tok/s; profiled self-CPU {allself/5e3:.1f} ms/step")
    for k, v in tot.most_common(): print(f"   {k:26s} {100*v/allself:5.1f} %")
    print("   top ops:", ", ".join(f"{e.key} {e.self_cpu_time_total/5e3:.2f}ms" for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]))
    # eval batch: 8192 tokens at 128 and 2048
    model.eval()
    for L in (128, 2048):
        x = torch.randint(0, 256, (8192 // L, L), generator=g)
        with torch.inference_mode():
            model(x); t = time.perf_counter()
            for _ in range(3):
                lg = model(x); F.cross_entropy(lg.float().transpose(1, 2), x, reduction="none").double()
            ev = (time.perf_counter() - t) / 3
            with profile(activities=[ProfilerActivity.CPU]) as p:
                lg = model(x); F.cross_entropy(lg.float().transpose(1, 2), x, reduction="none").double()
        ka = p.key_averages()
        print(f"   eval batch L={L}: {ev*1e3:.1f} ms ({8192/ev:,.0f} tok/s); top:", ", ".join(f"{e.key} {e.self_cpu_time_total/1e3:.1f}ms" for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:6]))
# matmul floor
nparam = sum(p.numel() for p in model.parameters())
B, L, D = 32, 128, 128
# forward flops: linear layers: per token per layer 2*(4D^2 (qkv+o) + 8D^2 (mlp)) ; head 2*D*256 ; attention 2*2*L*D per token (QK and AV, causal full)
lin = 3 * 2 * (4 * D * D + 8 * D * D) + 2 * D * 256
att = 3 * 2 * 2 * L * D
fwd = (lin + att) * B * L
train_flops = 3 * fwd
shapes = [(B*L, D, 3*D), (B*L, D, D), (B*L, D, 4*D), (B*L, 4*D, D), (B*L, D, 256)]
for (m, k, n) in shapes:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3): a @ b
    t = time.perf_counter()
    for _ in range(50): a @ b
    dt = (time.perf_counter() - t) / 50
    print(f"mm {m}x{k}x{n}: {2*m*k*n/dt/1e9:.1f} GFLOP/s")
a, b = torch.randn(B*L, D), torch.randn(D, 4*D)
t = time.perf_counter()
for _ in range(50): a @ b
gf = 2*B*L*D*4*D / ((time.perf_counter() - t)/50)
print(f"train FLOPs/step {train_flops/1e9:.2f} GFLOP (linear {3*lin*B*L/1e9:.2f}, attention {3*att*B*L/1e9:.2f}); at {gf/1e9:.0f} GFLOP/s floor {train_flops/gf*1e3:.1f} ms/step = {B*L/(train_flops/gf):,.0f} tok/s")

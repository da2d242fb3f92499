"""Study-speed probe (docs/study.md, 'On the Intel Xeon'): run as .venv/bin/python bench/study/perscheme.py ARGS from the project root."""
import sys, time, torch, statistics
import torch.nn.functional as F
from posemb.lab.train import ModelConfig, TrainConfig, build_model, make_optimizer, lr_at
from posemb.lab.data import RandomWindows
from posemb.lab.study import default_schemes
torch.set_num_threads(int(sys.argv[1]))
cfg = TrainConfig(steps=300); mc = ModelConfig()
data = torch.randint(0, 256, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
batches = RandomWindows(data, 128, 32, 0)
def make(scheme, foreach):
    model = build_model(scheme, mc, 128, seed=0); model.train()
    opt = make_optimizer(model, cfg)
    if foreach:
        for g in opt.param_groups: g["foreach"] = True
    s = [0]
    def step():
        x, y = batches(s[0])
        for g in opt.param_groups: g["lr"] = lr_at(s[0], cfg)
        loss = F.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        v = float(loss.detach()); opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); s[0] += 1
    return model, step
tot_train = {False: 0.0, True: 0.0}; tot_eval = 0.0
for scheme in default_schemes():
    runs = {f: make(scheme, f) for f in (False, True)}
    for f in runs: runs[f][1](); runs[f][1]()
    t = {False: [], True: []}
    for r in range(6):
        for f in (False, True):
            a = time.perf_counter(); runs[f][1](); t[f].append(time.perf_counter() - a)
    med = {f: statistics.median(t[f]) for f in t}
    for f in med: tot_train[f] += 300 * med[f]
    model = runs[False][0].eval(); ev = 0.0
    with torch.inference_mode():
        for L in (128, 256, 512, 1024, 2048):
            x = torch.randint(0, 256, (8192 // L, L))
            a = time.perf_counter()
            try:
                lg = model(x); F.cross_entropy(lg.float().transpose(1, 2), x, reduction="none")
            except Exception as e:
                continue
            ev += 4 * (time.perf_counter() - a)
    tot_eval += ev
    print(f"{scheme:22s} base {4096/med[False]:7,.0f} tok/s  foreach {4096/med[True]:7,.0f} tok/s (x{med[False]/med[True]:.3f})  "
          f"300 steps {300*med[False]:5.1f} s; eval (5 lengths x 32768 B, est.) {ev:5.1f} s", flush=True)
print(f"TOTAL training 300 steps x 15: base {tot_train[False]:.0f} s, foreach {tot_train[True]:.0f} s; eval est {tot_eval:.0f} s (+ rope variants 5 x 4 lengths)")

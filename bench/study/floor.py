"""Study-speed probe (docs/study.md, 'On the Intel Xeon'): run as .venv/bin/python bench/study/floor.py ARGS from the project root."""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
B, L, D = 32, 128, 128
def rate(m, k, n, dtype):
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(5): a @ b
    t = time.perf_counter()
    for _ in range(100): a @ b
    return 2 * m * k * n / ((time.perf_counter() - t) / 100) / 1e9
shapes = [(B*L, D, 3*D), (B*L, D, D), (B*L, D, 4*D), (B*L, 4*D, D), (B*L, D, 256)]
for dt in (torch.float32, torch.bfloat16):
    r = [rate(*s, dt) for s in shapes]
    print(f"threads {sys.argv[1]} {dt}: " + ", ".join(f"{m}x{k}x{n} {g:.0f}" for (m, k, n), g in zip(shapes, r)) + " GFLOP/s")
    # per step linear FLOPs, weighted by shape: fwd+2x bwd
    per_layer = [(shapes[0], 1), (shapes[1], 1), (shapes[2], 1), (shapes[3], 1)]
    secs = sum(3 * 3 * 2 * m * k * n / (g * 1e9) for ((m, k, n), _), g in zip(per_layer, r[:4])) + 3 * 2 * B*L*D*256 / (r[4] * 1e9)
    flops = 3 * 3 * 2 * B*L*(12*D*D) + 3 * 2 * B*L*D*256
    print(f"   linear layers of one training step: {flops/1e9:.2f} GFLOP -> {secs*1e3:.0f} ms at these rates = {B*L/secs:,.0f} tok/s ceiling (attention, elementwise, optimizer excluded)")

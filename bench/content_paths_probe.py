"""The fused content paths against the tiled path they replace and plain causal SDPA, in one process
(docs/performance.md, round three):
    .venv/bin/python bench/content_paths_probe.py [THREADS]

1. no-grad forward at 1 x 8 x 4096 x 64: peak resident-set growth (``posemb.bench.peak_memory_bytes``) and
   time, Shaw, DeBERTa, Transformer-XL (through attend(), and its fused path called directly);
2. attention forward + backward at 1 x 4 x 2048 x 64 (the step table's shape), the same schemes and FIRE,
   CoPE, the forgetting gate: median of 5;
3. CoPE's block budget (``cope_attention.BLOCK_ELEMENTS``): the step table's model, one step at 2048 tokens
   (median of 3) and its peak at 4096.
"""
import statistics
import sys
import time

import torch

import posemb
from posemb.bench import peak_memory_bytes
from posemb.model import TransformerLM, attention, cope_attention
from posemb.model.attention import attend

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
FLAGS = {"shaw": "_FAR_FIELD_FUSED", "deberta": "_FAR_FIELD_FUSED", "transformer_xl": "_RELATIVE_KEYS_FUSED",
         "fire": "_FIRE_FUSED", "cope": "_COPE_FUSED", "forgetting": "_KEY_BIAS_FUSED"}


def build(name, heads, head_dim):
    torch.manual_seed(0)
    options = {"shaw": dict(head_dim=head_dim), "deberta": dict(dim=heads * head_dim, num_heads=heads),
               "transformer_xl": dict(dim=heads * head_dim, num_heads=heads), "fire": dict(num_heads=heads),
               "cope": dict(head_dim=head_dim, num_heads=heads),
               "forgetting": dict(head_dim=head_dim, num_heads=heads)}[name]
    return posemb.build(name, **options)


def median_ms(function, repeats=5):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def with_flag(name, fused, function):
    setattr(attention, FLAGS[name], fused)
    try:
        return function()
    finally:
        setattr(attention, FLAGS[name], True)


print("1. no-grad forward, 1 x 8 x 4096 x 64", flush=True)
q, k, v = (torch.randn(1, 8, 4096, 64) for _ in range(3))
pos = torch.arange(4096)[None]
with torch.no_grad():
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    sdpa()
    print(f"  sdpa: {peak_memory_bytes(sdpa) / 2 ** 20:.1f} MiB, {median_ms(sdpa, 3):.0f} ms", flush=True)
    for name in ("shaw", "deberta", "transformer_xl"):
        scheme = build(name, 8, 64)
        call = lambda: attend(q, k, v, scheme, pos, pos, causal=True)  # noqa: E731
        for fused in (True, False):
            with_flag(name, fused, call)   # warm-up: the first call's one-time allocations are not the path's
            memory = with_flag(name, fused, lambda: peak_memory_bytes(call))
            ms = with_flag(name, fused, lambda: median_ms(call, 3))
            print(f"  {name} {'fused' if fused else 'tiled'}: {memory / 2 ** 20:.1f} MiB, {ms:.0f} ms", flush=True)
    # at batch 1 attend() keeps Transformer-XL's no-grad calls on the tiled path (its distance table is as
    # large as the output); the fused path called directly, for the record of why
    from posemb.model.relative_keys_attention import relative_keys_attention
    forced = lambda: relative_keys_attention(q, k, v, scheme, needs_grad=False)  # noqa: E731
    forced()
    print(f"  transformer_xl fused, called directly: {peak_memory_bytes(forced) / 2 ** 20:.1f} MiB, "
          f"{median_ms(forced, 3):.0f} ms", flush=True)

print("2. attention forward + backward, 1 x 4 x 2048 x 64", flush=True)
q, k, v = (torch.randn(1, 4, 2048, 64, requires_grad=True) for _ in range(3))
pos = torch.arange(2048)[None]
print(f"  sdpa: {median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()):.0f} ms",
      flush=True)
for name in ("shaw", "deberta", "transformer_xl", "fire", "cope", "forgetting"):
    scheme = build(name, 4, 64)
    step = lambda: attend(q, k, v, scheme, pos, pos, causal=True).sum().backward()  # noqa: E731
    fused, tiled = (with_flag(name, flag, lambda: median_ms(step)) for flag in (True, False))
    print(f"  {name}: fused {fused:.0f} ms, tiled {tiled:.0f} ms", flush=True)

print("3. CoPE block budget, TransformerLM(256, 256, 2, 4) step", flush=True)
for budget in (1 << 21, 1 << 20, 1 << 19):
    cope_attention.BLOCK_ELEMENTS = budget
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, dim=256, depth=2, heads=4, scheme="cope")
    optimizer = torch.optim.AdamW(model.parameters())

    def train(tokens):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    short, long = torch.randint(0, 256, (1, 2049)), torch.randint(0, 256, (1, 4097))
    ms = median_ms(lambda: train(short), 3)
    print(f"  2^{budget.bit_length() - 1}: {ms:.0f} ms, peak {peak_memory_bytes(lambda: train(long)) / 2 ** 20:.0f} MiB",
          flush=True)

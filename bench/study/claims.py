"""Pairwise claim verdicts of docs/study.md ("The newer schemes and the papers claims") from one or more study results.csv files: python bench/study/claims.py docs/study-claims/results.csv."""
"""Claims table from a posemb study results.csv (and optional extra seed-0 csv).

usage: claims.py RESULTS.csv [EXTRA.csv ...]
Rows for the same (scheme, eval_length) across files are merged as separate seeds only if
the file has seeds == 1; a multi-seed row is taken as is (mean, spread)."""
import csv, sys, statistics
from collections import defaultdict

per = defaultdict(dict)   # (scheme) -> {length: [(rise, loss, spread_rise, seeds)]}
for path in sys.argv[1:]:
    for r in csv.DictReader(open(path)):
        if r["rise"] in ("", None):
            continue
        per[r["scheme"]].setdefault(int(r["eval_length"]), []).append(
            (float(r["rise"]), float(r["loss"]), float(r["rise_spread"]) if r["rise_spread"] else None, int(r["seeds"])))

def stat(scheme, L):
    vals = per[scheme].get(L, [])
    if not vals:
        return None
    if len(vals) == 1:
        rise, loss, sp, n = vals[0]
        return rise, loss, sp, n
    rises = [v[0] for v in vals]; losses = [v[1] for v in vals]
    return statistics.mean(rises), statistics.mean(losses), max(rises) - min(rises), len(vals)

LT = 128
lengths = [256, 512, 1024, 2048]
order = ["alibi", "t5", "rope", "kerple", "sandwich", "fire", "dynamic_position_bias", "forgetting", "pope",
         "cope", "rope+randomized", "alibi+randomized", "t5+randomized"]
print("| scheme | seeds | loss @128 | rise 2x | rise 4x | rise 8x | rise 16x | loss @2048 |")
print("|---|---|---|---|---|---|---|---|")
for s in order:
    if s not in per:
        continue
    base = stat(s, LT)
    cells = []
    for L in lengths:
        st = stat(s, L)
        cells.append("n/a" if st is None else (f"{st[0]:+.3f}" + (f" [{st[2]:.3f}]" if st[2] is not None else "")))
    last = stat(s, 2048)
    print(f"| `{s}` | {base[3]} | {base[1]:.3f} | " + " | ".join(cells) + f" | {last[1]:.3f} |")

def cmp(a, b):
    """a claimed better than b: d = rise_b - rise_a > tol -> reproduced."""
    out = []
    for L in lengths:
        sa, sb = stat(a, L), stat(b, L)
        if sa is None or sb is None:
            out.append("n/a"); continue
        spa, spb = sa[2] or 0.0, sb[2] or 0.0
        tol = max(0.05, spa, spb)
        d = sb[0] - sa[0]
        sep = abs(d) > (spa + spb) / 2 if (sa[2] is not None and sb[2] is not None) else None
        v = "better" if d > tol else ("worse" if d < -tol else "noise")
        dl = sb[1] - sa[1]
        out.append(f"{d:+.3f}/tol {tol:.3f} {v}{'' if sep is None else (' sep' if sep else ' unsep')} (Δloss {dl:+.3f})")
    return out

print()
print("| claim (a better than b) | 2x | 4x | 8x | 16x |")
print("|---|---|---|---|---|")
pairs = [(a, b) for a in ("kerple", "sandwich", "fire") for b in ("alibi", "t5")] + \
        [(f"{s}+randomized", s) for s in ("rope", "alibi", "t5")] + \
        [(a, "alibi") for a in ("dynamic_position_bias", "forgetting", "pope", "cope")] + [("pope", "rope")]
for a, b in pairs:
    if a in per and b in per:
        print(f"| {a} vs {b} | " + " | ".join(cmp(a, b)) + " |")

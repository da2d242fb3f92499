"""Training step (forward + backward + AdamW) of TransformerLM(256, 256, 2, 4) with every registered scheme: time at 2048 tokens and peak memory at 4096, as ratios to NoPE's in the same run.

Usage: python bench/step.py [--quick] [--threads N] [--repeats N] [--output FILE]
(the same as ``posemb bench --sections step ...``; see posemb/bench.py for the method; the full run
takes about 2.5 minutes on 2 quiet CPU cores, far longer on an oversubscribed machine; --quick
well under a minute).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _run import run_sections  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_sections("step"))

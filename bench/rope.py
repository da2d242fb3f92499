"""RoPE application on q and k: posemb's fused kernel (in place, out=, out of place) against transformers, torchtune, rotary-embedding-torch and the copy floors.

Usage: python bench/rope.py [--quick] [--threads N] [--repeats N] [--output FILE]
(the same as ``posemb bench --sections rope ...``; see posemb/bench.py for the method).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _run import run_sections  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_sections("rope"))

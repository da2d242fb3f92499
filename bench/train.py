"""Training tokens/s of posemb.TransformerLM against x-transformers at the same size.

Usage: python bench/train.py [--quick] [--threads N] [--repeats N] [--output FILE]
(the same as ``posemb bench --sections train ...``; see posemb/bench.py for the method).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _run import run_sections  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_sections("train"))

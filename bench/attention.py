"""Attention with positions inside: Shaw / Transformer-XL / DeBERTa (time, peak memory) against SDPA and naive forms; T5 / ALiBi against causal SDPA.

Usage: python bench/attention.py [--quick] [--threads N] [--repeats N] [--output FILE]
(the same as ``posemb bench --sections relative,bias ...``; see posemb/bench.py for the method).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _run import run_sections  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_sections("relative,bias"))

"""``posemb demo``: build every registered scheme, run a forward pass, print a table."""
from __future__ import annotations

import time

import torch

from posemb._validation import check_int
from posemb.registry import available, scheme_class

#: The longest demo input: every scheme runs a forward pass at this length in a few seconds.
MAX_DEMO_LENGTH = 8192


def run_demo(dim: int = 128, depth: int = 2, heads: int = 4, length: int = 256, batch: int = 2) -> list[dict]:
    from posemb.model import TransformerLM

    check_int("length", length, minimum=2, maximum=MAX_DEMO_LENGTH)
    check_int("batch", batch, minimum=1, maximum=64)

    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (batch, length))
    rows = []
    for name in available():
        cls = scheme_class(name)
        model = TransformerLM(256, dim, depth, heads, scheme=name).eval()
        with torch.no_grad():
            model(tokens)  # warm-up
            start = time.perf_counter()
            logits = model(tokens)
            elapsed = time.perf_counter() - start
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))
        rows.append({"scheme": name, "family": cls.family, "site": cls.site,
                     "position_params": model.num_position_parameters(),
                     "forward_ms": 1000 * elapsed, "loss": float(loss)})
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'scheme':<16}{'family':<10}{'site':<10}{'pos. params':>12}{'forward ms':>12}{'init loss':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['scheme']:<16}{r['family']:<10}{r['site']:<10}{r['position_params']:>12,}"
                     f"{r['forward_ms']:>12.1f}{r['loss']:>11.3f}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="build every scheme, run one forward pass, print a table")
    parser.add_argument("--length", type=int, default=256,
                        help=f"sequence length (default 256, at most {MAX_DEMO_LENGTH})")
    parser.set_defaults(handler=lambda args: print(format_table(run_demo(length=args.length))))

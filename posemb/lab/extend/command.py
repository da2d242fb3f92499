"""The command line: ``posemb extend MODEL --target-length N`` and ``posemb extend --demo``
(:func:`add_parser`, registered by ``posemb.cli``)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from posemb.lab.distributed import dist_info, resolve_device, shutdown_distributed
from posemb.lab.extend.demo_model import train_demo_model
from posemb.lab.extend.finetune import FinetuneConfig
from posemb.lab.extend.methods import METHODS
from posemb.lab.extend.run import ExtendConfig, run_extend
from posemb.lab.extend.search import SearchConfig
from posemb.lab.progress import format_seconds

#: ``posemb extend --demo``: train the demo Llama at the study's length (128), extend it 4x and 8x with
#: every method, search, fine-tune the extrapolation and three interpolation methods, export the best.
#: 3 min 47 s on 2 quiet CPU cores (docs/extend.md), within the 10-minute budget of the README's demo.
DEMO = dict(targets=(512, 1024), eval_tokens=8_192, search_budget=16, search_tokens=4_096, finetune_steps=40,
            finetune_methods=("none", "linear", "yarn", "longrope"), passkey_samples=8,
            passkey_depths=(0.0, 0.5, 1.0))


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def _names(text: str, name: str) -> tuple[str, ...]:
    values = tuple(p.strip() for p in text.split(",") if p.strip())
    if not values:
        raise ValueError(f"{name} must name at least one of {list(METHODS)}, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> ExtendConfig:
    demo = args.demo
    if demo and args.model is not None:
        raise ValueError("give either MODEL or --demo, not both")
    if not demo and args.model is None:
        raise ValueError("MODEL is required: a local Hugging Face causal-LM folder (or use --demo)")
    if not demo and args.target_length is None:
        raise ValueError("--target-length is required (one length, or a comma-separated list)")
    out = args.out or ("extend-demo" if demo else "extend-report")
    targets = _ints(args.target_length, "--target-length") if args.target_length else DEMO["targets"]
    pick = lambda value, key, default: value if value is not None else (DEMO[key] if demo else default)  # noqa: E731
    search = SearchConfig(budget=pick(args.search_budget, "search_budget", SearchConfig.budget), seed=args.seed)
    finetune = FinetuneConfig(steps=pick(args.finetune_steps, "finetune_steps", 0),
                              batch_size=args.finetune_batch_size, lr=args.finetune_lr, seed=args.seed,
                              gradient_checkpointing=args.gradient_checkpointing)
    finetune_methods = (_names(args.finetune_methods, "--finetune-methods") if args.finetune_methods
                        else DEMO["finetune_methods"] if demo else ())
    methods = _names(args.methods, "--methods") if args.methods else METHODS
    if demo and not args.finetune_methods:
        finetune_methods = tuple(m for m in finetune_methods if m in methods) if finetune.steps else ()
    config = ExtendConfig(
        model=str(Path(out) / "demo-model") if demo else args.model, target_lengths=targets, methods=methods,
        out=out, data=args.data, trained_length=args.trained_length,
        eval_lengths=_ints(args.eval_lengths, "--eval-lengths") if args.eval_lengths else (),
        eval_tokens=pick(args.eval_tokens, "eval_tokens", ExtendConfig.eval_tokens),
        stride_fraction=args.stride_fraction,
        passkey_lengths=_ints(args.passkey_lengths, "--passkey-lengths") if args.passkey_lengths else (),
        passkey_depths=(_floats(args.passkey_depths, "--passkey-depths") if args.passkey_depths
                        else DEMO["passkey_depths"] if demo else ExtendConfig.passkey_depths),
        passkey_samples=pick(args.passkey_samples, "passkey_samples", ExtendConfig.passkey_samples),
        search=search, search_tokens=pick(args.search_tokens, "search_tokens", ExtendConfig.search_tokens),
        finetune=finetune, finetune_methods=finetune_methods,
        export=(args.export if args.export is not None else str(Path(out) / "export") if demo else None),
        export_method=args.export_method, device=args.device, dtype=args.dtype, threads=args.threads,
        checkpoint_every_s=args.checkpoint_every, progress=not args.no_progress, force=args.force, replace_own_export=demo,
        plots=not args.no_plots)
    return config.validate()


def _handle(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = config_from_args(args)
    argv = sys.argv[1:]
    command = ("posemb " + " ".join(shlex.quote(a) for a in argv)) if argv[:1] == ["extend"] else None
    try:
        if args.demo:
            if config.threads:
                import torch

                torch.set_num_threads(config.threads)
            marker = train_demo_model(config.model, seed=args.seed, data=config.data,
                                      device=resolve_device(config.device), progress=config.progress,
                                      checkpoint_every_s=config.checkpoint_every_s)
            if dist_info().is_main:
                print(f"demo model: {config.model} (trained {marker['result']['steps']} steps, "
                      f"loss {marker['result']['final_loss']:.3f})", file=sys.stderr)
        result = run_extend(config, command=command)
        if dist_info().is_main:
            print(f"report: {Path(result['out']) / 'report.md'} (wall time "
                  f"{format_seconds(time.perf_counter() - start)})")
            if result["export"]:
                print(f"exported {result['export']['label']} to {result['export']['dir']}")
    finally:
        shutdown_distributed(wait=sys.exc_info()[0] is None)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "extend", help="extend a RoPE causal LM's context: methods, LongRoPE search, fine-tune, measure, export",
        description="Extend the context of a local Hugging Face causal LM trained with plain RoPE: apply each "
                    "method (none, linear, ntk, dynamic, yarn, llama3, longrope with searched factors), optionally "
                    "fine-tune at the target length, measure sliding-window perplexity by length and passkey "
                    "retrieval, write report.md / results.csv / results.json / plots, and export the chosen method "
                    "as a folder plain transformers loads. Nothing is downloaded; the model folder is never written. "
                    "Rerun the same command to resume.")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="local Hugging Face folder (config.json + *.safetensors)")
    parser.add_argument("--demo", action="store_true",
                        help="train the demo Llama on the study's data at length 128 (OUT/demo-model), then extend "
                             "it 4x and 8x and export the best (about 4 minutes on 2 CPU cores)")
    parser.add_argument("--target-length", default=None, help="target context length(s), e.g. 1024 or 512,1024")
    parser.add_argument("--methods", default=None, help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    parser.add_argument("--out", default=None, help="report directory (default ./extend-report, demo ./extend-demo)")
    parser.add_argument("--data", default=None, help="text file or directory (default: the stdlib's .py files)")
    parser.add_argument("--trained-length", type=int, default=None,
                        help="the length MODEL was trained at (default: its config's max_position_embeddings)")
    parser.add_argument("--eval-lengths", default=None,
                        help="perplexity window lengths (default: trained length x 1, 2, 4, ... up to 2 x the target)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored at every length")
    parser.add_argument("--stride-fraction", type=float, default=0.5, help="sliding-window stride / window (0.5)")
    parser.add_argument("--passkey-lengths", default=None, help="passkey lengths (default: trained x 1, 2, ... target)")
    parser.add_argument("--passkey-depths", default=None, help="passkey depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--passkey-samples", type=int, default=None, help="samples per passkey cell (0: no passkey)")
    parser.add_argument("--search-budget", type=int, default=None, help="LongRoPE search evaluations (default 32)")
    parser.add_argument("--search-tokens", type=int, default=None, help="held-out tokens of the search's fitness")
    parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps at the target (0: none)")
    parser.add_argument("--finetune-methods", default=None, help="methods to fine-tune (default: every method)")
    parser.add_argument("--finetune-batch-size", type=int, default=4, help="global fine-tune batch (4)")
    parser.add_argument("--finetune-lr", type=float, default=2e-4, help="fine-tune peak learning rate (2e-4)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the fine-tune's backward pass (large models)")
    parser.add_argument("--export", default=None, metavar="DIR", help="write the chosen method as a Hugging Face folder")
    parser.add_argument("--export-method", default=None,
                        help="method to export (default: the lowest perplexity at the longest target)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search, fine-tune and passkey samples")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between fine-tune checkpoints (30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--force", action="store_true",
                        help="replace report files posemb did not write, and an existing non-empty --export DIR")
    parser.set_defaults(handler=_handle)

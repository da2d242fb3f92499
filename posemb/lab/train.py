"""Training one small decoder-only LM per scheme: single process, or ``torchrun`` DDP.

Recipe (nanoGPT-like): AdamW (beta 0.9/0.95, weight decay on matrices only), linear warm-up then
cosine decay to ``min_lr_ratio * lr``, gradient clipping at 1.0, next-byte cross-entropy.

Resumable and deterministic: the batch of step ``s`` depends only on ``(seed, s)``; a checkpoint
holds the weights, the optimizer state and the step, and is written atomically every
``checkpoint_every_s`` seconds and at the end. A run interrupted at any moment and restarted goes
on from the last checkpoint and sees the same batches an uninterrupted run would have seen.

Under DDP (``torchrun --nproc_per_node N``; gloo on CPU, NCCL on CUDA) every rank draws the same
global batch of ``batch_size`` rows and trains on its own ``batch_size / N`` rows; DDP averages
the gradients, so each step is the single-process step on the same global batch, and the replicas'
weights stay identical. Rank 0 alone writes checkpoints.

Command line (one scheme; ``posemb study`` runs many)::

    python -m posemb.lab.train --scheme rope --steps 200 --checkpoint runs/rope.pt
    torchrun --nproc_per_node 2 -m posemb.lab.train --scheme rope --steps 200 --checkpoint runs/rope.pt
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from posemb._validation import check_float, check_int
from posemb.functional.randomized import randomized_positions
from posemb.lab.checkpoint import atomic_torch_save, load_checkpoint
from posemb.lab.distributed import (barrier, dist_info, exit_process, init_distributed, resolve_device,
                                    shutdown_distributed)
from posemb.lab.errors import TrainingDiverged, exit_code, user_message
from posemb.lab.progress import token_bar
from posemb.model import TransformerLM
from posemb.registry import scheme_class, scheme_options


#: Upper bounds on sizes, far above anything this lab trains, so that a typo (an extra zero or
#: three) is an error naming the argument instead of an exhausted memory.
MAX_LENGTH = 1 << 20
MAX_DIM = 1 << 15
MAX_DEPTH = 1 << 10
MAX_BATCH_SIZE = 1 << 16
MAX_STEPS = 1 << 31
MAX_BATCH_TOKENS = 1 << 24


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 4

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "dim", "depth", "heads", "mlp_ratio"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("vocab_size", self.vocab_size, maximum=1 << 20)
        check_int("dim", self.dim, maximum=MAX_DIM)
        check_int("depth", self.depth, maximum=MAX_DEPTH)
        check_int("mlp_ratio", self.mlp_ratio, maximum=64)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


@dataclass(frozen=True)
class TrainConfig:
    train_length: int = 128
    batch_size: int = 32
    steps: int = 250
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> "TrainConfig":
        check_int("train_length", self.train_length, minimum=2, maximum=MAX_LENGTH)
        check_int("batch_size", self.batch_size, minimum=1, maximum=MAX_BATCH_SIZE)
        if isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps <= 0:
            raise ValueError(f"steps must be a positive number of optimizer steps, got {self.steps}")
        check_int("steps", self.steps, minimum=1, maximum=MAX_STEPS)
        if self.batch_size * self.train_length > MAX_BATCH_TOKENS:
            raise ValueError(f"batch_size x train_length must be <= {MAX_BATCH_TOKENS:,} tokens per step, got "
                             f"{self.batch_size} x {self.train_length} = {self.batch_size * self.train_length:,}")
        check_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_float("min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0)
        check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_float("grad_clip", self.grad_clip, minimum=0.0)
        return self


# ---- models ------------------------------------------------------------------------------------

def _scheme_names(scheme) -> list[str]:
    """The registered names in ``scheme``: one name, or a per-layer pattern of names / (name, options)."""
    if isinstance(scheme, str):
        return [scheme]
    if not isinstance(scheme, (list, tuple)) or not scheme:
        raise TypeError(f"scheme must be a scheme name or a non-empty per-layer pattern, got {scheme!r}")
    return [entry if isinstance(entry, str) else entry[0] for entry in scheme]


def scheme_model_options(scheme, train_length: int) -> dict:
    """Options a scheme needs from the training set-up: the learned table gets N_max = the training
    length (it must not, and does not, clamp beyond it); RoPE records the training length as its
    ``max_position_embeddings`` (what inference-time scaling is relative to). ``scheme`` may be a
    per-layer pattern (:mod:`posemb.model.scheme_pattern`): an option goes to every entry taking it."""
    allowed: dict = {}
    for name in _scheme_names(scheme):
        allowed.update(scheme_options(name))
    options = {}
    if "max_positions" in allowed:
        options["max_positions"] = train_length
    if "max_position_embeddings" in allowed:
        options["max_position_embeddings"] = train_length
    return options


def build_model(scheme, model: ModelConfig, train_length: int, *, seed: int | None = None,
                **overrides) -> TransformerLM:
    """A :class:`TransformerLM` for ``scheme`` (a name or a per-layer pattern); ``seed`` fixes its
    initial weights."""
    for name in _scheme_names(scheme):
        scheme_class(name)  # a clear "unknown scheme" error first
    options = scheme_model_options(scheme, train_length)
    options.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return TransformerLM(model.vocab_size, model.dim, model.depth, model.heads, scheme=scheme,
                         mlp_ratio=model.mlp_ratio, **options)


class RandomizedPositions:
    """Training batches with randomized positions (Ruoss et al. 2023, arXiv 2305.16843, section 3):
    ``batches(step)``'s (inputs, targets) and, per row, a sorted random subset of ``[0, max_position)``
    of the row's length (:func:`posemb.functional.randomized.randomized_positions`).

    The positions of step ``s`` depend only on ``(seed, s)`` (their own generator, apart from the
    batches'), so a resumed run sees the positions an uninterrupted one would, and every DDP rank
    draws the same global batch of positions and keeps its own rows."""

    def __init__(self, batches: Callable[[int], tuple[Tensor, Tensor]], max_position: int, seed: int) -> None:
        self.batches = batches
        self.max_position = check_int("max_position", max_position, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        inputs, targets = self.batches(step)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) ^ 0x5EED_0F_F5E7)
        positions = randomized_positions(inputs.shape[0], inputs.shape[1], self.max_position, generator=generator)
        return inputs, targets, positions


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, or the tied embedding/head,
    whose rows of rare bytes decay away otherwise)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.dim() >= 2 and id(parameter) not in embedding_ids else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- checks ------------------------------------------------------------------------------------

def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---- the training loop ------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    final_loss: float
    resumed_from_step: int
    checkpoint_sha256: str | None = None  # of the final checkpoint, on the rank that wrote it

    def to_dict(self) -> dict:
        return asdict(self)


def train_model(model: TransformerLM, batches: Callable[[int], tuple[Tensor, Tensor]], config: TrainConfig, *,
                device: str = "cpu", checkpoint_path: str | os.PathLike | None = None,
                checkpoint_every_s: float = 30.0, checkpoint_every_steps: int | None = None,
                progress: bool = True, desc: str = "train", name: str | None = None,
                on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` steps, resuming from ``checkpoint_path`` if it exists.

    ``batches(step)`` returns the global (inputs, targets) batch of that step, each (batch, length),
    or (inputs, targets, positions) when the model is to see other positions than ``0..length-1``
    (:class:`RandomizedPositions`).
    ``on_step(step)`` is called after each finished step (its checkpoint, if due, already written).
    A loss that is not finite stops training with :class:`TrainingDiverged` naming the run
    (``name``, default ``desc``) and the step, before that step changes the weights; the last
    checkpoint stays as it was.
    """
    config.validate()
    info = dist_info()
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of DDP processes "
                         f"({info.world_size})")
    rows = config.batch_size // info.world_size
    row_slice = slice(info.rank * rows, (info.rank + 1) * rows)
    model.to(device)
    optimizer = make_optimizer(model, config)
    start_step, train_seconds, recent_loss = 0, 0.0, float("nan")
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device,
                                advice="delete it to train from the start")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, train_seconds = int(state["step"]), float(state["train_seconds"])
        recent_loss = float(state.get("recent_loss", float("nan")))
    # DDP broadcasts rank 0's weights at construction; every rank loaded the same checkpoint anyway.
    if info.active:
        ddp_kwargs = {"device_ids": [torch.device(device).index]} if device.startswith("cuda") else {}
        trained = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        trained = model
    use_amp = device.startswith("cuda")
    tokens_per_step = config.batch_size * config.train_length

    saved_step = start_step if checkpoint_path is not None and checkpoint_path.exists() else None

    def save(step: int) -> str | None:
        nonlocal saved_step
        if checkpoint_path is None:
            return None
        saved_step = step
        if not info.is_main:
            return None
        return atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                  "train_seconds": train_seconds, "recent_loss": recent_loss,
                                  "train_config": asdict(config)}, checkpoint_path)

    model.train()
    last_save = time.perf_counter()
    losses: list[float] = []
    with token_bar(config.steps * tokens_per_step, desc, enabled=progress and info.is_main,
                   initial=start_step * tokens_per_step) as bar:
        for step in range(start_step, config.steps):
            tick = time.perf_counter()
            batch = batches(step)
            inputs, targets = batch[0][row_slice].to(device), batch[1][row_slice].to(device)
            positions = batch[2][row_slice].to(device) if len(batch) > 2 else None
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = trained(inputs) if positions is None else trained(inputs, positions=positions)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            value = float(loss.detach())
            if not math.isfinite(value):
                kept = (f"its checkpoint from step {saved_step} is kept" if saved_step is not None
                        else "no checkpoint was written")
                raise TrainingDiverged(f"{name or desc}: training diverged, the loss became {value} at step "
                                       f"{step + 1} of {config.steps} (lr {lr_at(step, config):.3g}); lower --lr. "
                                       f"The run is not marked finished; {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(value)
            losses = losses[-20:]
            recent_loss = sum(losses) / len(losses)
            train_seconds += time.perf_counter() - tick
            bar.update(tokens_per_step)
            bar.set_postfix_str(f"loss {recent_loss:.3f}", refresh=False)
            done = step + 1
            due = (checkpoint_every_steps is not None and done % checkpoint_every_steps == 0) or \
                (time.perf_counter() - last_save >= checkpoint_every_s)
            if due and done < config.steps:
                save(done)
                last_save = time.perf_counter()
            if on_step is not None:
                on_step(done)
    if info.active:
        # The mean over ranks of each rank's recent loss is the global batch's recent loss.
        summary = torch.tensor([recent_loss, train_seconds], dtype=torch.float64, device=device)
        dist.all_reduce(summary)
        recent_loss, train_seconds = (summary / info.world_size).tolist()
    digest = save(config.steps)
    barrier()
    model.eval()
    trained_tokens = config.steps * tokens_per_step
    return TrainResult(steps=config.steps, tokens=trained_tokens, train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds > 0 else float("nan"),
                       final_loss=recent_loss, resumed_from_step=start_step, checkpoint_sha256=digest)


# ---- command line (one scheme; runs under torchrun) ---------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m posemb.lab.train",
                                     description="Train one small LM with one positional scheme (torchrun-ready).")
    parser.add_argument("--scheme", default="rope")
    parser.add_argument("--data", default=None, help="text file or directory (default: the stdlib's .py files)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--train-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split over DDP processes")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (resumed from when it exists)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m posemb.lab.train ...``; errors the user can fix are one line on stderr."""
    args = _parse(argv)
    try:
        return _train_one(args)
    except Exception as error:  # noqa: BLE001 - only errors user_message knows are turned into a line
        line = user_message(error)
        if line is None:
            raise
        print(f"python -m posemb.lab.train: error: {line}", file=sys.stderr)
        return exit_code(error)


def _train_one(args: argparse.Namespace) -> int:
    from posemb.lab.data import RandomWindows, load_corpus

    if args.threads:
        torch.set_num_threads(check_int("threads", args.threads, minimum=1))
    device = resolve_device(args.device)
    info = init_distributed(device)
    try:

        model_config = ModelConfig(dim=args.dim, depth=args.depth, heads=args.heads).validate()
        config = TrainConfig(train_length=args.train_length, batch_size=args.batch_size, steps=args.steps,
                             lr=args.lr, warmup_steps=min(20, max(0, args.steps // 10))).validate()
        corpus = load_corpus(args.data)
        model = build_model(args.scheme, model_config, config.train_length, seed=args.seed)
        batches = RandomWindows(corpus.train, config.train_length, config.batch_size, args.seed)
        result = train_model(model, batches, config, device=device, checkpoint_path=args.checkpoint,
                             progress=not args.no_progress, desc=f"{args.scheme} seed {args.seed}")
        digest = parameter_digest(model)
        if info.active:
            gathered: list[str | None] = [None] * info.world_size
            dist.all_gather_object(gathered, digest)
            identical = len(set(gathered)) == 1
        else:
            identical = True
        if info.is_main:
            print(f"scheme={args.scheme} steps={result.steps} final_loss={result.final_loss:.4f} "
                  f"tokens_per_s={result.tokens_per_s:.0f} world_size={info.world_size} "
                  f"replicas_identical={identical} digest={digest[:16]}", flush=True)
        return 0 if identical else 1
    finally:
        if info.active:
            shutdown_distributed(wait=sys.exc_info()[0] is None)


if __name__ == "__main__":
    exit_process(main())

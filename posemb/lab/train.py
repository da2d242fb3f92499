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
from posemb.lab.checkpoint import atomic_torch_save, load_checkpoint
from posemb.lab.progress import token_bar
from posemb.model import TransformerLM
from posemb.registry import scheme_class, scheme_options


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
        check_int("train_length", self.train_length, minimum=2)
        check_int("batch_size", self.batch_size, minimum=1)
        if isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps <= 0:
            raise ValueError(f"steps must be a positive number of optimizer steps, got {self.steps}")
        check_int("steps", self.steps, minimum=1)
        check_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_float("min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0)
        check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_float("grad_clip", self.grad_clip, minimum=0.0)
        return self


# ---- models ------------------------------------------------------------------------------------

def scheme_model_options(scheme: str, train_length: int) -> dict:
    """Options a scheme needs from the training set-up: the learned table gets N_max = the training
    length (it must not, and does not, clamp beyond it); RoPE records the training length as its
    ``max_position_embeddings`` (what inference-time scaling is relative to)."""
    allowed = scheme_options(scheme)
    options = {}
    if "max_positions" in allowed:
        options["max_positions"] = train_length
    if "max_position_embeddings" in allowed:
        options["max_position_embeddings"] = train_length
    return options


def build_model(scheme: str, model: ModelConfig, train_length: int, *, seed: int | None = None,
                **overrides) -> TransformerLM:
    """A :class:`TransformerLM` for ``scheme``; ``seed`` fixes its initial weights."""
    scheme_class(scheme)  # a clear "unknown scheme" error first
    options = scheme_model_options(scheme, train_length)
    options.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return TransformerLM(model.vocab_size, model.dim, model.depth, model.heads, scheme=scheme,
                         mlp_ratio=model.mlp_ratio, **options)


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


# ---- distributed ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the current process group (1 process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL
    on CUDA); a plain process stays alone. Returns this process's :class:`DistInfo`."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist_info()


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU; under DDP on CUDA, each rank its LOCAL_RANK GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
        if device == "cuda" and launched_by_torchrun():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def shutdown_distributed(*, wait: bool = True) -> None:
    """Leave the process group: wait for every rank (``wait``), then destroy it. Without the
    barrier one rank could tear down gloo while its peer still used the connection, and gloo's
    background thread then aborted the process at exit ("terminate called without an active
    exception", seen in about half of 2-process CPU runs). After an error, ``wait=False``: the
    other ranks may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info().active:
        dist.barrier()


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

    def to_dict(self) -> dict:
        return asdict(self)


class StopTraining(Exception):
    """Raised by an ``on_step`` hook in tests to simulate an interruption (Ctrl-C / kill)."""


def train_model(model: TransformerLM, batches: Callable[[int], tuple[Tensor, Tensor]], config: TrainConfig, *,
                device: str = "cpu", checkpoint_path: str | os.PathLike | None = None,
                checkpoint_every_s: float = 30.0, checkpoint_every_steps: int | None = None,
                progress: bool = True, desc: str = "train",
                on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` steps, resuming from ``checkpoint_path`` if it exists.

    ``batches(step)`` returns the global (inputs, targets) batch of that step, each (batch, length).
    ``on_step(step)`` is called after each finished step (its checkpoint, if due, already written).
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
        state = load_checkpoint(checkpoint_path, map_location=device)
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

    def save(step: int) -> None:
        if checkpoint_path is not None and info.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                               "train_seconds": train_seconds, "recent_loss": recent_loss,
                               "train_config": asdict(config)}, checkpoint_path)

    model.train()
    last_save = time.perf_counter()
    losses: list[float] = []
    with token_bar(config.steps * tokens_per_step, desc, enabled=progress and info.is_main,
                   initial=start_step * tokens_per_step) as bar:
        for step in range(start_step, config.steps):
            tick = time.perf_counter()
            inputs, targets = batches(step)
            inputs, targets = inputs[row_slice].to(device), targets[row_slice].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = trained(inputs)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; lower --lr")
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
    save(config.steps)
    barrier()
    model.eval()
    trained_tokens = config.steps * tokens_per_step
    return TrainResult(steps=config.steps, tokens=trained_tokens, train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds > 0 else float("nan"),
                       final_loss=recent_loss, resumed_from_step=start_step)


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
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(check_int("threads", args.threads, minimum=1))
    device = resolve_device(args.device)
    info = init_distributed(device)
    try:
        from posemb.lab.data import RandomWindows, load_corpus

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


def exit_now(code: int) -> None:
    """End a ``torchrun`` worker without running C++ static destructors. Even after a barrier and
    ``destroy_process_group``, gloo's threads were sometimes torn down in the wrong order at
    interpreter exit and the process aborted ("terminate called without an active exception",
    exit -6) after all of its work was done and written. Flushing and ``os._exit`` skips that."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _code = main()
    if launched_by_torchrun():
        exit_now(_code)
    raise SystemExit(_code)

"""A short causal-LM fine-tune at the target length, after a method's RoPE is in place.

It is the lab's training loop (:func:`posemb.lab.train.train_model`) on the transformers model seen
through :class:`~posemb.lab.extend.hf_model.LogitsOnly`: AdamW with warm-up and cosine decay,
gradient clipping, batches drawn by :class:`posemb.lab.data.RandomWindows` (batch of step ``s``
fixed by ``(seed, s)``), an atomic checkpoint every ``checkpoint_every_s`` seconds and at the end,
resumed from when it exists, and data-parallel under ``torchrun`` (each rank its slice of the global
batch, gradients averaged). Weight decay is off by default: a fine-tune should move the pretrained
weights only where the data asks (the PI paper fine-tunes without it).

Memory on a large model: ``gradient_checkpointing`` recomputes each layer's activations in the
backward pass (transformers' ``activation_checkpointing_enable``), and on CUDA the forward runs under
bfloat16 autocast; the weights keep the dtype they were loaded in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor, nn

from posemb._validation import check_bool, check_float, check_int
from posemb.lab.data import RandomWindows
from posemb.lab.extend.hf_model import LogitsOnly
from posemb.lab.train import TrainConfig, TrainResult, train_model


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 0
    batch_size: int = 4
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    gradient_checkpointing: bool = False

    def validate(self) -> "FinetuneConfig":
        check_int("--finetune-steps", self.steps, minimum=0)
        check_int("--finetune-batch-size", self.batch_size, minimum=1)
        check_float("--finetune-lr", self.lr, minimum=0.0, strict_minimum=True)
        check_int("finetune warmup_steps", self.warmup_steps, minimum=0)
        check_float("finetune weight_decay", self.weight_decay, minimum=0.0)
        check_int("--seed", self.seed, minimum=0)
        check_bool("--gradient-checkpointing", self.gradient_checkpointing)
        return self

    def train_config(self, length: int) -> TrainConfig:
        return TrainConfig(train_length=length, batch_size=self.batch_size, steps=self.steps, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, max(0, self.steps - 1)), min_lr_ratio=0.1,
                           weight_decay=self.weight_decay, grad_clip=1.0).validate()


def finetune(model: nn.Module, tokens: Tensor, length: int, config: FinetuneConfig, *, device: str = "cpu",
             checkpoint_path: str | os.PathLike | None = None, checkpoint_every_s: float = 30.0,
             checkpoint_every_steps: int | None = None, progress: bool = False, name: str = "finetune",
             on_step=None) -> TrainResult:
    """Fine-tune the transformers causal LM ``model`` in place on windows of ``length`` + 1 of the
    1-D ``tokens``, resuming from ``checkpoint_path`` when it exists."""
    config.validate()
    if config.steps < 1:
        raise ValueError("finetune needs --finetune-steps >= 1")
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if config.gradient_checkpointing:
        enable()
    batches = RandomWindows(tokens, length, config.batch_size, config.seed)
    wrapped = LogitsOnly(model)
    try:
        return train_model(wrapped, batches, config.train_config(length), device=device,
                           checkpoint_path=checkpoint_path, checkpoint_every_s=checkpoint_every_s,
                           checkpoint_every_steps=checkpoint_every_steps, progress=progress, desc=name,
                           name=name, on_step=on_step)
    finally:
        if config.gradient_checkpointing:
            disable()
        model.eval()

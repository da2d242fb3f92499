"""The demo checkpoint: a tiny ``LlamaForCausalLM`` trained on the study's data at the study's length.

Why not the study's own RoPE model: posemb's :class:`~posemb.model.TransformerLM` is a GPT-style
block (LayerNorm with bias, GELU MLP with two matrices, tied head); a Llama block is RMSNorm without
bias and a SwiGLU MLP with three matrices. No mapping of weights makes one compute the other, so a
study run cannot be written as a Llama folder exactly. The honest nearest thing is a model *trained
as* a Llama on the same data with the same recipe: the standard library's source bytes
(:func:`posemb.lab.data.load_corpus`, vocabulary 256), the study's ``quick`` profile (width 128, depth
3, 4 heads, training length 128, batch 32, its steps, learning rate and warm-up), the lab's training
loop (:func:`posemb.lab.train.train_model`: resumable from its checkpoint). The folder records the
trained length as ``max_position_embeddings`` = 128.

``intermediate_size`` is ``8/3 x width`` rounded to a multiple of 8, so the SwiGLU MLP has the
parameter count of the study's 4 x width GELU MLP (the LLaMA paper's rule).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from posemb.lab.checkpoint import atomic_write_json
from posemb.lab.errors import OutputDirError
from posemb.lab.data import VOCAB_SIZE, RandomWindows, load_corpus
from posemb.lab.extend.hf_model import LogitsOnly, require_transformers
from posemb.lab.train import TrainConfig, TrainResult, train_model

TRAIN_CHECKPOINT = "train-checkpoint.pt"
MARKER = "posemb_demo.json"


def demo_recipe(steps: int | None = None) -> tuple[dict, TrainConfig]:
    """(LlamaConfig keyword arguments, training config) from the study's ``quick`` profile."""
    from posemb.lab.study import PROFILES

    profile = PROFILES["quick"]
    model, train = profile["model"], profile["train"]
    intermediate = int(round(8 * model.dim / 3 / 8)) * 8
    llama = dict(vocab_size=VOCAB_SIZE, hidden_size=model.dim, intermediate_size=intermediate,
                 num_hidden_layers=model.depth, num_attention_heads=model.heads, num_key_value_heads=model.heads,
                 max_position_embeddings=train.train_length, rope_theta=10000.0, tie_word_embeddings=True,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if steps is not None:
        train = replace(train, steps=steps, warmup_steps=min(train.warmup_steps, max(0, steps // 10)))
    return llama, train.validate()


def build_llama(llama_kwargs: dict, seed: int):
    transformers = require_transformers()
    config = transformers.LlamaConfig(**llama_kwargs)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def is_demo_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def train_demo_model(folder: str | os.PathLike, *, steps: int | None = None, seed: int = 0, data: str | None = None,
                     device: str = "cpu", progress: bool = True, checkpoint_every_s: float = 30.0) -> dict:
    """Train the demo Llama (resuming from ``folder/../<name>.train-checkpoint.pt``) and write it to
    ``folder`` as a Hugging Face folder; a finished folder is reused as it is. Returns its marker."""
    folder = Path(folder)
    if is_demo_folder(folder):
        from posemb.lab.checkpoint import read_json

        return read_json(folder / MARKER)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputDirError(f"{str(folder)!r} exists and is not a finished posemb demo model: move it away or "
                             "choose another --out")
    llama_kwargs, train = demo_recipe(steps)
    corpus = load_corpus(data)
    model = build_llama(llama_kwargs, seed)
    checkpoint = folder.parent / f"{folder.name}.{TRAIN_CHECKPOINT}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    result: TrainResult = train_model(LogitsOnly(model), RandomWindows(corpus.train, train.train_length,
                                                                      train.batch_size, seed), train,
                                      device=device, checkpoint_path=checkpoint, checkpoint_every_s=checkpoint_every_s,
                                      progress=progress, desc="demo llama", name="demo llama")
    marker = {"what": "posemb extend demo checkpoint: LlamaForCausalLM trained on the study's data and recipe",
              "llama": llama_kwargs, "train": {k: getattr(train, k) for k in train.__dataclass_fields__},
              "seed": seed, "corpus": corpus.describe(), "result": result.to_dict()}
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.cpu().save_pretrained(staging, safe_serialization=True)
        atomic_write_json(staging / MARKER, marker)
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return marker

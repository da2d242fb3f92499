"""A local Hugging Face causal-LM folder: checked before any work, loaded, and given a method's RoPE.

Checks (:func:`inspect_folder`, no weights read): the folder exists and holds ``config.json`` and
safetensors weights; the architecture is a causal LM whose base model owns one ``rotary_emb`` module
(Llama, Qwen2, Mistral and the other Llama-family models; built on the meta device to find out, so
nothing is allocated); its RoPE is plain (``rope_type`` default, one dict, not per layer type): an
already-scaled model is refused rather than scaled twice. GPT-2 and other models without RoPE are
refused by name.

A method is applied (:func:`apply_setting`) by writing its ``rope_parameters`` and
``max_position_embeddings`` into the loaded model's config and rebuilding the model's own rotary
class from it: exactly what ``from_pretrained`` builds from the exported ``config.json``, so the
logits measured here are the logits of the exported folder. The weights are never touched.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from posemb.lab.errors import LabError
from posemb.lab.extend.methods import MethodSetting, RopeGeometry

CONFIG_NAME = "config.json"


class ModelFolderError(LabError):
    """MODEL cannot be extended: what is wrong with it, and where."""


def require_transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only where transformers is absent
        raise ModelFolderError("posemb extend needs the optional dependency 'transformers' "
                               "(pip install 'transformers>=4.46')") from error
    return transformers


@dataclass(frozen=True)
class ModelInfo:
    path: str
    model_type: str
    architecture: str
    geometry: RopeGeometry
    vocab_size: int
    num_parameters: int
    has_tokenizer: bool
    fingerprint: str  # SHA-256 prefix of config.json and the weight files' names and sizes

    def to_dict(self) -> dict:
        return {"path": self.path, "model_type": self.model_type, "architecture": self.architecture,
                "rope_theta": self.geometry.base, "rotary_dim": self.geometry.rotary_dim,
                "trained_length": self.geometry.trained_length, "vocab_size": self.vocab_size,
                "num_parameters": self.num_parameters, "has_tokenizer": self.has_tokenizer,
                "fingerprint": self.fingerprint}


def _rotary_owner(model: nn.Module) -> nn.Module | None:
    for owner in (getattr(model, "model", None), model):
        if isinstance(owner, nn.Module) and isinstance(getattr(owner, "rotary_emb", None), nn.Module):
            return owner
    return None


def _fingerprint(folder: Path, weights: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
    for path in weights:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def inspect_folder(path: str | os.PathLike, *, trained_length: int | None = None) -> ModelInfo:
    """Everything ``posemb extend`` needs to know about MODEL, or a :class:`ModelFolderError` naming
    what is wrong (see the module docstring). ``trained_length`` overrides the config's
    ``max_position_embeddings`` as the length the model was trained at."""
    transformers = require_transformers()
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"MODEL {str(folder)!r} is not a directory: give a local Hugging Face model folder "
                               "(config.json + *.safetensors); nothing is downloaded")
    if not (folder / CONFIG_NAME).is_file() and (folder / "run.json").is_file():
        raise ModelFolderError(f"MODEL {str(folder)!r} is a posemb study run: its TransformerLM (LayerNorm, GELU "
                               "MLP) has no exact Hugging Face equivalent; extend the demo Llama instead "
                               "(posemb extend --demo), trained on the same data with the same recipe")
    if not (folder / CONFIG_NAME).is_file():
        raise ModelFolderError(f"MODEL {str(folder)!r} has no {CONFIG_NAME}: not a Hugging Face model folder")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelFolderError(f"MODEL {str(folder)!r} has no *.safetensors weights (save it with "
                               "save_pretrained(..., safe_serialization=True))")
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"MODEL {str(folder / CONFIG_NAME)!r} is not valid JSON: {error}") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise ModelFolderError(f"MODEL {str(folder)!r}: transformers cannot read its config: {error}") from None
    model_type = getattr(config, "model_type", raw.get("model_type", "?"))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise ModelFolderError(f"MODEL {str(folder)!r} (model_type {model_type!r}) is not a causal LM that "
                               f"transformers can build: {str(error).splitlines()[0]}") from None
    owner = _rotary_owner(skeleton)
    if owner is None:
        raise ModelFolderError(f"MODEL {str(folder)!r} ({type(skeleton).__name__}) has no rotary position "
                               "embedding (rotary_emb): context extension by RoPE scaling needs a RoPE model "
                               "(Llama, Qwen2, Mistral, ...)")
    num_parameters = sum(p.numel() for p in skeleton.parameters())
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):
        raise ModelFolderError(f"MODEL {str(folder)!r} has per-layer-type rope_parameters {sorted(rope)}: "
                               "posemb extend handles one RoPE for every layer")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelFolderError(f"MODEL {str(folder)!r} already uses rope_type {rope_type!r}: posemb extend starts "
                               "from a model trained with plain RoPE (rope_type 'default'), so that no scaling "
                               "is applied twice")
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    rotary_dim = int(head_dim * (1.0 if partial is None else float(partial)))
    carried = {} if partial is None or "partial_rotary_factor" not in rope else {"partial_rotary_factor": partial}
    length = trained_length if trained_length is not None else getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise ModelFolderError(f"MODEL {str(folder)!r}: the trained length is unknown (config "
                               f"max_position_embeddings = {length!r}); pass --trained-length")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    has_tokenizer = any((folder / name).is_file() for name in tokenizer_files)
    return ModelInfo(path=str(folder), model_type=str(model_type), architecture=type(skeleton).__name__,
                     geometry=RopeGeometry(base, rotary_dim, length, carried), vocab_size=int(config.vocab_size),
                     num_parameters=int(num_parameters), has_tokenizer=has_tokenizer,
                     fingerprint=_fingerprint(folder, weights))


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of {['auto', *table]}, got {dtype!r}")
    return table[dtype]


def load_model(path: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               trained_length: int | None = None) -> nn.Module:
    """The model of folder ``path`` in eval mode on ``device``; its config's rope is left as saved.
    ``trained_length`` (when it differs from the config) is written into the in-memory config only."""
    transformers = require_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if trained_length is not None:
        model.config.max_position_embeddings = trained_length
    return model.to(device).eval()


def apply_setting(model: nn.Module, setting: MethodSetting) -> nn.Module:
    """Give ``model`` the RoPE of ``setting``: its config gets the new ``rope_parameters`` and
    ``max_position_embeddings``, and its rotary module is rebuilt by its own class from that config
    (what ``from_pretrained`` does with the exported folder). Returns the new rotary module."""
    owner = _rotary_owner(model)
    if owner is None:
        raise ModelFolderError(f"{type(model).__name__} has no rotary_emb module")
    config = model.config
    config.rope_parameters = copy.deepcopy(setting.rope_parameters)
    config.max_position_embeddings = setting.max_position_embeddings
    old = owner.rotary_emb
    device = next((b.device for b in old.buffers()), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns about keys it validates loosely
        rotary = type(old)(config=config)
    owner.rotary_emb = rotary.to(device)
    return owner.rotary_emb


class LogitsOnly(nn.Module):
    """``forward(input_ids) -> logits`` of a transformers causal LM (no cache), the call signature of
    posemb's own models, so the lab's training loop and evaluators run it unchanged. ``keep`` last
    positions only (``logits_to_keep``), when only those are scored."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, keep: int = 0) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits


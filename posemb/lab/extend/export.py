"""``--export DIR``: the chosen method as a Hugging Face folder that plain transformers loads.

The folder holds what ``save_pretrained`` writes (``config.json`` with the method's
``rope_parameters`` and ``max_position_embeddings``, safetensors weights: the original ones, or the
fine-tuned ones when the chosen row was fine-tuned), the source folder's tokenizer files, and
``posemb_extend.json`` (which method, the measured numbers; transformers ignores it).
``AutoModelForCausalLM.from_pretrained(DIR)`` then builds the very rotary that posemb measured
(:func:`posemb.lab.extend.hf_model.apply_setting` builds it the same way), without posemb installed.

Checked before any work (:func:`check_export_dir`): DIR is not a file, not the source model folder,
its parent is writable, and an existing non-empty DIR is refused unless ``--force``. The files are
written to a temporary folder beside DIR first and moved in one by one, so a crash never leaves a
half-written weights file under its final name; with ``--force`` only the files of the export are
replaced, anything else in DIR stays.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from posemb.lab.checkpoint import atomic_write_json
from posemb.lab.errors import OutputDirError
from posemb.lab.outdir import check_writable_directory

META_NAME = "posemb_extend.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def check_export_dir(path: str | os.PathLike, *, model_folder: str | os.PathLike, force: bool) -> Path:
    """Refuse an unusable ``--export`` before any work (see the module docstring)."""
    path = Path(path)
    if not str(path).strip():
        raise OutputDirError("--export must name a directory, got an empty string")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--export {str(path)!r} is a file, not a directory")
    if path.exists() and Path(model_folder).exists() and os.path.samefile(path, model_folder):
        raise OutputDirError(f"--export {str(path)!r} is the source MODEL folder: posemb never writes into the "
                             "model it extends; choose another directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputDirError(f"--export {str(path)!r} exists and is not empty: rerun with --force to replace the "
                             "exported files in it, or choose another directory")
    check_writable_directory(path.parent if str(path.parent) else Path("."), "the folder of --export")
    if path.is_dir():
        check_writable_directory(path, "--export")
    return path


def write_export(model: nn.Module, path: str | os.PathLike, *, model_folder: str | os.PathLike, meta: dict) -> Path:
    """Write ``model`` (its config already carrying the method's RoPE) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES:
            source = Path(model_folder) / name
            if source.is_file() and not (staging / name).exists():
                shutil.copyfile(source, staging / name)
        atomic_write_json(staging / META_NAME, meta)
        path.mkdir(parents=True, exist_ok=True)
        # the config goes last: until it is in place the folder is not a loadable model
        names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "config.json")
        for name in names:
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path

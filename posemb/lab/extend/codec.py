"""Text to token ids for the model being extended.

A model with a 256-entry vocabulary and no tokenizer files is byte-level (posemb's demo checkpoint
and the study's models): the ids are the UTF-8 bytes, as in :mod:`posemb.lab.data`. Otherwise the
folder's own tokenizer (``AutoTokenizer``, local files only) encodes, without special tokens, so a
window is text and nothing else.
"""
from __future__ import annotations

import torch
from torch import Tensor

from posemb.lab.data import VOCAB_SIZE
from posemb.lab.extend.hf_model import ModelFolderError, ModelInfo, require_transformers


class Codec:
    """``encode(text) -> 1-D long tensor``; ``byte_level`` says whether ids are bytes."""

    def __init__(self, info: ModelInfo) -> None:
        self.byte_level = info.vocab_size == VOCAB_SIZE and not info.has_tokenizer
        self.tokenizer = None
        if not self.byte_level:
            if not info.has_tokenizer:
                raise ModelFolderError(f"MODEL {info.path!r} has a vocabulary of {info.vocab_size} and no tokenizer "
                                       "files: posemb cannot turn text into its ids (a byte-level model has 256)")
            transformers = require_transformers()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(info.path, local_files_only=True)

    def encode(self, text: str) -> Tensor:
        if self.byte_level:
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def from_bytes(self, data: Tensor, max_tokens: int | None = None) -> Tensor:
        """Token ids of a uint8 byte tensor (a corpus split); at most ``max_tokens`` of them. Byte ids
        stay ``uint8`` (an eighth of the memory); every consumer indexes windows, then casts them."""
        if self.byte_level:
            return data if max_tokens is None else data[:max_tokens]
        # about 3-4 bytes per token for source code; a margin so the cut is rarely short
        take = data if max_tokens is None else data[: 8 * max_tokens]
        ids = self.encode(bytes(take.tolist()).decode("utf-8", errors="replace"))
        return ids if max_tokens is None else ids[:max_tokens]

"""Train and score one (task, scheme, seed) of the algorithmic suite.

Training: the loss is the cross-entropy of the answer tokens only (every other target is
``IGNORE``); each step draws one instance length uniformly from ``1..L`` and a batch of instances
of that length (:func:`posemb.lab.algorithmic.tasks.curriculum_length`), with the study's recipe
(:func:`posemb.lab.train.train_model`: AdamW, warm-up + cosine, clipping, atomic checkpoints,
resume, DDP under ``torchrun``).

Scoring is **teacher-forced argmax** on the answer tokens: the model reads the whole instance
once and each answer token is right when the argmax of the logits before it equals it. The
*per-token accuracy* is the share of right answer tokens, the *exact match* the share of
instances whose answer tokens are all right. Exact match under teacher forcing equals exact match
under greedy decoding: when every token is right, greedy decoding has fed itself exactly the
teacher-forced prefix at every step; when one is wrong, both count the instance wrong (greedy
stops being right at its first mistake, whatever follows). Per-token accuracy after a first
mistake is the teacher-forced one (as Ruoss et al. 2023 score), which is cheaper than decoding
answer tokens one by one.

Positions are ``0..T-1`` unless the scheme spec asks for **randomized positions** (Ruoss et al.
2023, §3): then each sequence's positions are a sorted random subset of ``[0, N)``, at training
and at test time alike (google-deepmind/randomized_positional_encodings, ``models/transformer.py``,
draws the noisy positions in every call, training or not), with ``N`` at least the longest test
sequence, so a test sequence only uses positions the model has met in training.

Test-time RoPE scalings (``rope+yarn``, ...) rebuild the RoPE-trained model with the scaling
stretched by ``factor = test sequence length / longest training sequence``, as ``posemb study``
does (:func:`posemb.lab.evaluate.rope_variant_options`); at lengths within training every
scaling is the identity, and the trained rope's own score is reused.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posemb.lab.algorithmic.tasks import Task, curriculum_length, derived_seed, make_batch
from posemb.lab.evaluate import ROPE_VARIANTS, load_trained_weights, rope_variant_options
from posemb.lab.train import ModelConfig, build_model
from posemb.model import TransformerLM
from posemb.registry import scheme_class, scheme_options
from posemb.schemes.learned import PositionOutOfRange

RANDOMIZED = "randomized"
RANDOMIZED_MODULE = "posemb.functional.randomized"


# ---- scheme specs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """A label of the suite: ``scheme`` trained with default or randomized positions, optionally
    scored with a test-time RoPE scaling (``variant``). ``rope+yarn`` is scored on the ``rope`` run."""

    scheme: str
    randomized: bool = False
    variant: str | None = None

    @property
    def label(self) -> str:
        return self.scheme + (f"+{RANDOMIZED}" if self.randomized else "") + (f"+{self.variant}" if self.variant else "")

    @property
    def run_label(self) -> str:
        """The label of the trained model this spec is scored on."""
        return self.scheme + (f"+{RANDOMIZED}" if self.randomized else "")


def parse_spec(text: str) -> Spec:
    """``scheme``, ``scheme+randomized`` or ``rope+<test-time scaling>`` (one of
    :data:`posemb.lab.evaluate.ROPE_VARIANTS`); anything else raises ``ValueError`` saying what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a scheme spec must be a non-empty string, got {text!r}")
    scheme, *options = [part.strip() for part in text.strip().split("+")]
    scheme_class(scheme)  # unknown schemes: ValueError listing the available ones
    randomized, variant = False, None
    for option in options:
        if option == RANDOMIZED and not randomized and variant is None:
            randomized = True
        elif option in ROPE_VARIANTS and variant is None and scheme == "rope" and not randomized:
            variant = option
        else:
            raise ValueError(f"scheme spec {text!r}: after the scheme name, allowed are '+{RANDOMIZED}' (training "
                             f"with randomized positions, any scheme) or, for plain rope only, one test-time scaling "
                             f"'+' one of {list(ROPE_VARIANTS)}; got '+{option}'")
    if randomized:
        require_randomized(text)
    return Spec(scheme, randomized, variant)


def randomized_available() -> bool:
    return importlib.util.find_spec(RANDOMIZED_MODULE) is not None


def require_randomized(what: str) -> None:
    if not randomized_available():
        raise ValueError(f"{what!r} asks for randomized positions, which need {RANDOMIZED_MODULE} "
                         "(Ruoss et al. 2023); this build of posemb does not have it")


def random_positions(batch: int, length: int, max_position: int, seed: int) -> Tensor:
    """Sorted random subsets of ``[0, max_position)``, one of size ``length`` per row (Ruoss et al.
    2023): the package's formula in :mod:`posemb.functional.randomized`."""
    require_randomized(f"+{RANDOMIZED}")
    module = importlib.import_module(RANDOMIZED_MODULE)
    generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return module.randomized_positions(batch, length, max_position, generator=generator)


def default_positions(batch: int, length: int) -> Tensor:
    return torch.arange(length).expand(batch, length)


class PositionedLM(nn.Module):
    """A :class:`TransformerLM` that reads ``(batch, 2, T)``: tokens in row 0, positions in row 1.
    Training's batch function hands both through :func:`posemb.lab.train.train_model` (which
    slices rows for DDP and calls ``model(inputs)``) without a second argument."""

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, packed: Tensor) -> Tensor:
        return self.lm(packed[:, 0], positions=packed[:, 1])


def pack(tokens: Tensor, positions: Tensor) -> Tensor:
    return torch.stack([tokens, positions.to(tokens.dtype)], dim=1)


# ---- models -------------------------------------------------------------------------------------

def build_run_model(spec: Spec, model: ModelConfig, train_length: int, position_range: int, *,
                    seed: int | None = None, **overrides) -> TransformerLM:
    """The model of a run. ``train_length`` is the longest training sequence (what RoPE's scalings
    are relative to); the learned table gets ``position_range`` rows, every position a test may
    use, so that it is scored on its untrained rows beyond training (the anchors' setting) rather
    than refused."""
    options = dict(overrides)
    if "max_positions" in scheme_options(spec.scheme):
        options.setdefault("max_positions", position_range)
    return build_model(spec.scheme, model, train_length, seed=seed, **options)


def variant_model(state: dict, variant: str, factor: float, model: ModelConfig, train_length: int,
                  position_range: int) -> TransformerLM:
    """The RoPE-trained weights ``state`` in a model rebuilt with the test-time scaling ``variant``."""
    options = rope_variant_options(variant, factor, train_length)
    lm = build_run_model(Spec("rope"), model, train_length, position_range, **options)
    return load_trained_weights(lm, state)


# ---- training -----------------------------------------------------------------------------------

class TrainingBatches:
    """``batches(step)`` for :func:`posemb.lab.train.train_model`: the packed (tokens, positions)
    inputs and the answer-only targets of step ``step``, a function of ``(task, seed, step)`` alone."""

    def __init__(self, task: Task, spec: Spec, max_length: int, batch_size: int, seed: int,
                 position_range: int) -> None:
        self.task, self.spec, self.max_length = task, spec, max_length
        self.batch_size, self.seed, self.position_range = batch_size, seed, position_range

    def length_at(self, step: int) -> int:
        return curriculum_length(self.seed, step, self.max_length)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        n = self.length_at(step)
        batch = make_batch(self.task, n, self.batch_size, seed=self.seed, stream=f"train:{step}")
        inputs = batch.inputs
        if self.spec.randomized:
            positions = random_positions(inputs.shape[0], inputs.shape[1], self.position_range,
                                         derived_seed("positions", self.seed, step))
        else:
            positions = default_positions(*inputs.shape)
        return pack(inputs, positions), batch.targets


# ---- scoring ------------------------------------------------------------------------------------

@torch.inference_mode()
def score(lm: TransformerLM, task: Task, n: int, samples: int, *, eval_seed: int, randomized: bool,
          position_range: int, device: str = "cpu", batch_tokens: int = 16_384) -> dict:
    """Teacher-forced exact match and per-token accuracy of ``lm`` on ``samples`` test instances of
    length ``n`` (the same instances for every scheme and seed: they depend on ``eval_seed`` only).

    Returns ``{"exact", "token", "count", "note"}``; a model that cannot address the positions
    (a learned table too short) gives ``None`` scores and a note, never a clamped number."""
    batch = make_batch(task, n, samples, seed=eval_seed, stream="test")
    inputs, targets = batch.inputs, batch.targets
    if randomized:
        positions = random_positions(inputs.shape[0], inputs.shape[1], position_range,
                                     derived_seed("test-positions", eval_seed, n))
    else:
        positions = default_positions(*inputs.shape)
    answer = slice(batch.answer_start - 1, None)
    rows = max(1, batch_tokens // inputs.shape[1])
    right_tokens, right_rows = 0, 0
    use_amp = device.startswith("cuda")
    for first in range(0, samples, rows):
        x = inputs[first:first + rows].to(device)
        p = positions[first:first + rows].to(device)
        y = targets[first:first + rows, answer].to(device)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = lm(x, positions=p)
        except PositionOutOfRange as error:
            return {"exact": None, "token": None, "count": 0, "note": f"n/a: {error}"}
        right = logits[:, answer].argmax(-1) == y
        right_tokens += int(right.sum())
        right_rows += int(right.all(dim=1).sum())
    return {"exact": right_rows / samples, "token": right_tokens / (samples * task.answer_length(n)),
            "count": samples, "note": ""}


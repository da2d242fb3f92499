"""Evaluation by length: language-model loss on the same validation bytes cut into windows of each
length, loss per position bucket, passkey accuracy by (length, depth), and the rebuilding of a
RoPE-trained model with an inference-time frequency schedule (linear, NTK, dynamic NTK, YaRN,
Llama 3) for evaluation without fine-tuning.

Under DDP the windows are shared out over the ranks and the sums are all-reduced, so every rank
returns the same numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from posemb._validation import check_int
from posemb.lab import passkey
from posemb.lab.data import windows
from posemb.lab.distributed import dist_info
from posemb.lab.progress import token_bar
from posemb.lab.train import ModelConfig, RandomizedPositions, build_model
from posemb.model import TransformerLM
from posemb.registry import available, scheme_class, scheme_options
from posemb.schemes.base import PositionalScheme
from posemb.schemes.learned import PositionOutOfRange

BEYOND_N_MAX = "n/a (beyond N_max)"
#: position buckets per doubling of the position in the loss-by-position curves
BUCKETS_PER_OCTAVE = 4

@dataclass(frozen=True)
class Variant:
    """A variant of a trained scheme: a row of the report named ``scheme+name``.

    ``stage`` says what it changes. ``"evaluation"``: the scheme's trained weights rebuilt with
    another inference-time schedule and scored without training of their own (``rope+yarn``;
    :func:`variant_model`); the row reads "eval only" and shares the scheme's runs and seeds.
    ``"training"``: the scheme trained differently, so the row is its own run with its own weights
    (``rope+randomized``; :func:`row_model`, :func:`row_batches`), named in ``--schemes``.
    ``schemes`` are the trained schemes it applies to (None: every scheme whose layers read positions).
    """

    name: str
    stage: str
    schemes: tuple[str, ...] | None
    source: str

    def applies_to(self, scheme: str) -> bool:
        if self.schemes is not None:
            return scheme in self.schemes
        return any(scheme_class(name).site != "none" for name in set(_pattern_names(scheme)))


VARIANT_STAGES = ("evaluation", "training")

#: Every variant, by name. The evaluation-stage ones are evaluated on every run of their scheme
#: (``--rope-variants`` chooses among them); a training-stage one is a row of its own in ``--schemes``.
VARIANTS: dict[str, Variant] = {
    "linear": Variant("linear", "evaluation", ("rope",), "position interpolation, Chen et al. 2023"),
    "ntk": Variant("ntk", "evaluation", ("rope",), "NTK-aware base stretch, bloc97 2023"),
    "dynamic": Variant("dynamic", "evaluation", ("rope",), "dynamic NTK, Hugging Face transformers"),
    "yarn": Variant("yarn", "evaluation", ("rope",), "YaRN, Peng et al. 2023"),
    "llama3": Variant("llama3", "evaluation", ("rope",), "Llama 3.1 frequency bands, Meta 2024"),
    "randomized": Variant("randomized", "training", None,
                          "randomized positions, Ruoss et al. 2023 (arXiv 2305.16843, section 3)"),
}
ROPE_VARIANTS = tuple(v.name for v in VARIANTS.values() if v.stage == "evaluation" and v.applies_to("rope"))
TRAINING_VARIANTS = tuple(v.name for v in VARIANTS.values() if v.stage == "training")


@dataclass(frozen=True)
class Hybrid:
    """A study row whose layers mix schemes: a per-layer pattern for
    :class:`~posemb.model.TransformerLM` (:mod:`posemb.model.scheme_pattern`) built for a depth."""

    name: str
    family: str
    pattern: Callable[[int], list[str]]
    source: str


def irope_pattern(depth: int, interval: int = 4) -> list[str]:
    """Llama 4's iRoPE layer pattern: layer ``i`` (from 0) is NoPE when ``(i + 1) % interval == 0``,
    RoPE otherwise (transformers ``models/llama4/configuration_llama4.py``: ``no_rope_layers[i] =
    int((i + 1) % no_rope_layer_interval != 0)``, interval 4), so depth 8 gives
    ``rope, rope, rope, nope, rope, rope, rope, nope``.

    A model shallower than ``interval`` has no such layer and would be exactly RoPE; it gets its last
    layer NoPE instead (one truncated group, closed by its NoPE layer as every group is): depth 3
    gives ``rope, rope, nope``, a 2:1 ratio instead of 3:1. Depth 1 cannot mix and is refused.
    """
    check_int("depth", depth, minimum=1)
    check_int("interval", interval, minimum=2)
    if depth == 1:
        raise ValueError("the irope row needs depth >= 2: a one-layer model cannot mix RoPE and NoPE layers")
    pattern = ["nope" if (i + 1) % interval == 0 else "rope" for i in range(depth)]
    if "nope" not in pattern:
        pattern[-1] = "nope"
    return pattern


#: Study rows that are per-layer patterns rather than one registered scheme.
HYBRIDS: dict[str, Hybrid] = {
    "irope": Hybrid("irope", "rotary", irope_pattern,
                    "Llama 4 iRoPE: three RoPE layers then one NoPE layer (no attention temperature tuning)"),
}


@dataclass(frozen=True)
class Row:
    """What one study row trains and how it is scored: a registered scheme or a :data:`HYBRIDS`
    name (``base``), the training-stage variants it is trained with (``training``, e.g.
    ``("randomized",)``), and at most one evaluation-stage variant (``evaluation``). Written
    ``base[+training...][+evaluation]``: ``rope``, ``rope+randomized``, ``irope``, ``rope+yarn``."""

    base: str
    training: tuple[str, ...] = ()
    evaluation: str | None = None

    @property
    def label(self) -> str:
        return "+".join((self.base, *self.training) + ((self.evaluation,) if self.evaluation else ()))

    @property
    def run_label(self) -> str:
        """The label of the trained run this row is scored on (the row without its evaluation variant)."""
        return "+".join((self.base, *self.training))

    @property
    def randomized(self) -> bool:
        return "randomized" in self.training


def _pattern_names(base: str) -> list[str]:
    """The registered scheme names of a row base (a hybrid's at depth 8: enough to see every entry)."""
    if base in HYBRIDS:
        return HYBRIDS[base].pattern(8)
    scheme_class(base)
    return [base]


def parse_row(text: str, *, allow_evaluation: bool = True) -> Row:
    """``scheme``, ``hybrid``, ``scheme+randomized`` or ``rope+<inference-time scaling>``; anything
    else raises ``ValueError`` saying what is allowed. ``allow_evaluation=False`` (``--schemes``)
    refuses the evaluation-stage variants, which are chosen with ``--rope-variants`` instead."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a scheme must be a non-empty string, got {text!r}")
    base, *options = [part.strip() for part in text.strip().split("+")]
    if base not in HYBRIDS:
        try:
            scheme_class(base)
        except ValueError:
            raise ValueError(f"unknown scheme {base!r} in {text!r}; available: registered schemes "
                             f"({', '.join(available())}) and hybrids ({', '.join(HYBRIDS)})") from None
    training: list[str] = []
    evaluation = None
    for option in options:
        variant = VARIANTS.get(option)
        if variant is None or option in training or evaluation is not None:
            raise ValueError(f"scheme {text!r}: after the scheme name come training variants "
                             f"({', '.join('+' + v for v in TRAINING_VARIANTS)}), then at most one inference-time "
                             f"variant ({', '.join('+' + v for v in ROPE_VARIANTS)}, plain rope only); got '+{option}'")
        if not variant.applies_to(base):
            raise ValueError(f"scheme {text!r}: +{option} does not apply to {base!r}" +
                             (" (its layers read no positions)" if variant.schemes is None else
                              f" (only to {', '.join(variant.schemes)})"))
        if variant.stage == "training":
            training.append(option)
        elif training:
            raise ValueError(f"scheme {text!r}: +{option} rescales a plain {base} run; it is not defined on "
                             f"{'+'.join([base, *training])}")
        elif not allow_evaluation:
            raise ValueError(f"scheme {text!r}: +{option} is an inference-time variant, evaluated on every {base} "
                             f"run without training of its own; choose those with --rope-variants, not --schemes")
        else:
            evaluation = option
    return Row(base, tuple(training), evaluation)


def row_family(row: Row) -> str:
    return HYBRIDS[row.base].family if row.base in HYBRIDS else scheme_class(row.base).family


def row_scheme(row: Row, depth: int) -> str | list[str]:
    """What ``TransformerLM(scheme=...)`` gets: the scheme name, or the hybrid's pattern at ``depth``."""
    return HYBRIDS[row.base].pattern(depth) if row.base in HYBRIDS else row.base


def row_model(row: Row, model_config: ModelConfig, train_length: int, position_range: int, *,
              seed: int | None = None, **overrides) -> TransformerLM:
    """The trained model of ``row`` (its evaluation variant, if any, is :func:`variant_model`'s job).

    With randomized positions the learned table gets ``position_range`` rows (every position the
    training draws), instead of ``L_train``."""
    options = dict(overrides)
    if row.randomized and any("max_positions" in scheme_options(n) for n in _pattern_names(row.base)):
        options.setdefault("max_positions", position_range)
    return build_model(row_scheme(row, model_config.depth), model_config, train_length, seed=seed, **options)


def row_batches(row: Row, batches: Callable, position_range: int, seed: int) -> Callable:
    """The training batches of ``row``: ``batches`` itself, or with randomized positions in
    ``[0, position_range)`` (:class:`~posemb.lab.train.RandomizedPositions`)."""
    if row.randomized:
        return RandomizedPositions(batches, position_range, seed)
    return batches


def variant_label(scheme: str, variant: str | None) -> str:
    """The report's name for ``scheme`` (``variant=None``) or one of its variants: ``rope+yarn``."""
    return scheme if variant is None else f"{scheme}+{variant}"


def evaluation_labels(scheme: str, variants: tuple[str, ...]) -> dict[str, dict]:
    """``{label: {"base_scheme", "variant", "training"}}`` of what a run of the row ``scheme`` is
    evaluated as: the trained row itself, then each evaluation-stage variant of ``variants`` that
    applies to it (a plain registered scheme named in the variant's ``schemes``)."""
    row = parse_row(scheme, allow_evaluation=False)
    training = "+".join(row.training) or None
    labels = {scheme: {"base_scheme": scheme, "variant": None, "training": training}}
    for variant in variants:
        spec = VARIANTS.get(variant)
        if spec is not None and spec.stage == "evaluation" and not row.training and row.base not in HYBRIDS \
                and spec.applies_to(row.base):
            labels[variant_label(scheme, variant)] = {"base_scheme": scheme, "variant": variant, "training": None}
    return labels


def rope_variant_options(variant: str, factor: float, train_length: int) -> dict:
    """Scheme options that rebuild RoPE with ``variant`` stretched by ``factor`` = eval / train length.

    Every variant uses that same factor and ``max_position_embeddings = train_length`` (YaRN and
    Llama 3 also ``original_max_position_embeddings = train_length``; linear, NTK and dynamic take
    ``factor`` alone). Llama 3 uses ``low_freq_factor = 1``, ``high_freq_factor = 4`` (Llama 3.1's
    values); YaRN keeps the Hugging Face defaults (``beta_fast = 32``, ``beta_slow = 1``, attention
    factor ``0.1 ln(factor) + 1``). For ``dynamic`` the Hugging Face formula at the target length
    gives base * (factor**2 - factor + 1) ** (d / (d - 2)).
    """
    if variant not in ROPE_VARIANTS:
        raise ValueError(f"rope variant must be one of {list(ROPE_VARIANTS)}, got {variant!r}")
    scaling: dict = {"factor": float(factor)}
    if variant in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = train_length
    if variant == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return {"rope_type": variant, "scaling": scaling, "max_position_embeddings": train_length}


def _scheme_buffer_names(model: TransformerLM) -> set[str]:
    """Names (state-dict style) of every buffer that belongs to a positional scheme."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, PositionalScheme):
            for buffer_name, _ in module.named_buffers(recurse=True):
                names.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names


def load_trained_weights(model: TransformerLM, state: dict) -> TransformerLM:
    """Load trained weights into a model that may use another frequency schedule.

    A scheme's buffers (``inv_freq``, cos/sin tables) describe the schedule the model is *built*
    with; a saved copy from training would silently overwrite the new schedule, so they are never
    loaded, whether or not the scheme registered them as persistent. Parameters must match exactly.
    """
    protected = _scheme_buffer_names(model)
    before = {name: buffer.clone() for name, buffer in model.named_buffers() if name in protected}
    filtered = {k: v for k, v in state.items() if k not in protected}
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    missing = [k for k in missing if k not in protected]
    unexpected = [k for k in unexpected if k not in protected]
    if missing or unexpected:
        raise ValueError(f"trained weights do not fit the model: missing {missing}, unexpected {unexpected}")
    for name, buffer in model.named_buffers():
        if name in before and not torch.equal(before[name], buffer):
            raise RuntimeError(f"loading trained weights changed the scheme buffer {name!r}")
    return model


def rope_variant_model(state: dict, variant: str, factor: float, model_config: ModelConfig,
                       train_length: int, device: str) -> TransformerLM:
    model = build_model("rope", model_config, train_length, **rope_variant_options(variant, factor, train_length))
    return load_trained_weights(model, state).to(device).eval()


def variant_model(scheme: str, variant: str, state: dict, factor: float, model_config: ModelConfig,
                  train_length: int, device: str) -> TransformerLM:
    """The trained weights ``state`` of ``scheme`` in a model rebuilt with ``variant`` at
    ``factor = eval length / train length``."""
    spec = VARIANTS.get(variant)
    if spec is None or spec.stage != "evaluation" or not spec.applies_to(scheme):
        raise ValueError(f"{variant!r} is not an inference-time variant of scheme {scheme!r}; those of rope: "
                         f"{list(ROPE_VARIANTS)}")
    if scheme == "rope":
        return rope_variant_model(state, variant, factor, model_config, train_length, device)
    raise ValueError(f"no inference-time variants are defined for scheme {scheme!r}")


# ---- language-model loss by length --------------------------------------------------------------

def _shard(n: int) -> range:
    info = dist_info()
    return range(info.rank, n, info.world_size)


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist_info().active:
        dist.all_reduce(tensor)
    return tensor


def bucket_edges(length: int, per_octave: int = BUCKETS_PER_OCTAVE) -> list[int]:
    """Position bucket boundaries ``0 = e_0 < e_1 < ... = length``, spaced geometrically
    (``per_octave`` per doubling): loss changes fastest over the first bytes of a window, and a
    log axis shows the training length and every multiple of it equally well."""
    check_int("length", length, minimum=1)
    edges = {0, length}
    k = 0
    while 2 ** (k / per_octave) < length:
        edges.add(int(round(2 ** (k / per_octave))))
        k += 1
    return sorted(e for e in edges if e <= length)


def bucket_losses(position_loss_sum: Tensor, position_count: Tensor) -> list[dict]:
    """Mean loss over each position bucket of :func:`bucket_edges`: ``[{"start", "stop", "loss"}, ...]``."""
    edges = bucket_edges(position_loss_sum.numel())
    out = []
    for start, stop in zip(edges, edges[1:]):
        count = float(position_count[start:stop].sum())
        out.append({"start": start, "stop": stop,
                    "loss": float(position_loss_sum[start:stop].sum()) / count if count else None})
    return out


@torch.inference_mode()
def lm_loss_at_length(model: TransformerLM, chunks: Tensor, length: int, *, reference: Tensor | None = None,
                      device: str = "cpu", batch_tokens: int = 8192, progress: bool = False,
                      desc: str = "eval") -> tuple[dict, Tensor | None]:
    """Mean next-byte loss (nats/token) of ``model`` on evaluation ``chunks`` (see
    :func:`posemb.lab.data.evaluation_chunks`) cut into windows of ``length``.

    Returns ``(result, token_losses)``. ``result`` is ``{"eval_length", "loss", "ppl", "tokens",
    "seconds", "buckets", "rise_buckets", "note"}``; ``token_losses`` is every target byte's loss in
    chunk layout, shape ``chunks.shape[0] x (chunks.shape[1] - 1)``.

    ``buckets`` is the mean loss per position bucket of the window. Given ``reference`` (the token
    losses of the same model at the training length), ``rise_buckets`` is the mean, per position
    bucket, of each byte's loss minus its loss at the training length: the same bytes, so the text's
    own difficulty cancels and what remains is the effect of the longer window alone (exactly 0
    before the training length, where both windows hold the same context).

    A scheme that cannot address the positions (the learned table beyond N_max) gives
    ``loss = None``, ``note = "n/a (beyond N_max)"`` and no token losses: never a clamped number.
    """
    inputs, targets = windows(chunks, length)
    rows_per_batch = max(1, batch_tokens // length)
    mine = list(_shard(inputs.shape[0]))
    token_losses = torch.zeros(inputs.shape, dtype=torch.float64)
    use_amp = device.startswith("cuda")
    start = time.perf_counter()
    note = ""
    with token_bar(len(mine) * length, desc, enabled=progress and dist_info().is_main) as bar:
        for first in range(0, len(mine), rows_per_batch):
            index = torch.tensor(mine[first:first + rows_per_batch])
            x, y = inputs[index].to(device), targets[index].to(device)
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
            except PositionOutOfRange:
                note = BEYOND_N_MAX
                break
            per_token = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            token_losses[index] = per_token.double().cpu()
            bar.update(x.numel())
    flag = torch.tensor([1.0 if note else 0.0], dtype=torch.float64)
    _all_reduce_sum(flag)
    if float(flag) > 0:
        return ({"eval_length": length, "loss": None, "ppl": None, "tokens": 0, "seconds": time.perf_counter() - start,
                 "buckets": [], "rise_buckets": [], "note": BEYOND_N_MAX}, None)
    _all_reduce_sum(token_losses)  # each window was scored by exactly one rank; the others hold zeros
    count = torch.full((length,), float(inputs.shape[0]), dtype=torch.float64)
    loss = float(token_losses.mean())
    result = {"eval_length": length, "loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": token_losses.numel(),
              "seconds": time.perf_counter() - start, "buckets": bucket_losses(token_losses.sum(0), count),
              "rise_buckets": [], "note": ""}
    in_chunks = token_losses.reshape(chunks.shape[0], -1)
    if reference is not None:
        if reference.shape != in_chunks.shape:
            raise ValueError(f"reference token losses must have shape {tuple(in_chunks.shape)}, "
                             f"got {tuple(reference.shape)}")
        difference = (in_chunks - reference).reshape(-1, length)
        result["rise_buckets"] = bucket_losses(difference.sum(0), count)
    return result, in_chunks


# ---- passkey ------------------------------------------------------------------------------------

@torch.inference_mode()
def passkey_at_length(model: TransformerLM, length: int, *, depths=passkey.DEFAULT_DEPTHS, samples: int = 32,
                      seed: int = 0, device: str = "cpu", batch_tokens: int = 8192) -> list[dict]:
    """Accuracy (exact match of all key digits) and key-digit loss at ``length``, one dict per depth."""
    results = []
    rows_per_batch = max(1, batch_tokens // length)
    use_amp = device.startswith("cuda")
    for depth in depths:
        inputs, targets, answers = passkey.evaluation_set(length, depth, samples, seed)
        mine = list(_shard(samples))
        sums = torch.zeros(3, dtype=torch.float64)  # correct samples, loss sum over digits, digits
        start = time.perf_counter()
        beyond = False
        for first in range(0, len(mine), rows_per_batch):
            index = torch.tensor(mine[first:first + rows_per_batch])
            x, y, answer = inputs[index].to(device), targets[index].to(device), answers[index].to(device)
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
            except PositionOutOfRange:
                beyond = True
                break
            answer_logits = logits.float().gather(1, answer[..., None].expand(-1, -1, logits.shape[-1]))
            answer_targets = y.gather(1, answer)
            nll = F.cross_entropy(answer_logits.transpose(1, 2), answer_targets, reduction="none")
            correct = (answer_logits.argmax(-1) == answer_targets).all(-1)
            sums += torch.tensor([float(correct.sum()), float(nll.sum()), float(nll.numel())], dtype=torch.float64)
        flag = _all_reduce_sum(torch.tensor([1.0 if beyond else 0.0], dtype=torch.float64))
        if float(flag) > 0:
            results.append({"eval_length": length, "depth": depth, "accuracy": None, "loss": None, "ppl": None,
                            "samples": 0, "seconds": time.perf_counter() - start, "note": BEYOND_N_MAX})
            continue
        _all_reduce_sum(sums)
        correct, nll_sum, digits = sums.tolist()
        loss = nll_sum / digits
        results.append({"eval_length": length, "depth": depth, "accuracy": correct / (digits / passkey.KEY_DIGITS),
                        "loss": loss, "ppl": math.exp(min(loss, 700.0)), "samples": int(digits) // passkey.KEY_DIGITS,
                        "seconds": time.perf_counter() - start, "note": ""})
    return results


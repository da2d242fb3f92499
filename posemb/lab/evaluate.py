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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from posemb._validation import check_int
from posemb.lab import passkey
from posemb.lab.data import windows
from posemb.lab.distributed import dist_info
from posemb.lab.progress import token_bar
from posemb.lab.train import ModelConfig, build_model
from posemb.model import TransformerLM
from posemb.schemes.base import PositionalScheme
from posemb.schemes.learned import PositionOutOfRange

BEYOND_N_MAX = "n/a (beyond N_max)"
#: position buckets per doubling of the position in the loss-by-position curves
BUCKETS_PER_OCTAVE = 4

#: Inference-time variants of a trained scheme, evaluated on its weights without fine-tuning:
#: trained scheme -> variant names. :func:`variant_model` builds each; its label in the report is
#: :func:`variant_label`.
VARIANTS: dict[str, tuple[str, ...]] = {
    "rope": ("linear", "ntk", "dynamic", "yarn", "llama3"),
}
ROPE_VARIANTS = VARIANTS["rope"]


def variant_label(scheme: str, variant: str | None) -> str:
    """The report's name for ``scheme`` (``variant=None``) or one of its variants: ``rope+yarn``."""
    return scheme if variant is None else f"{scheme}+{variant}"


def evaluation_labels(scheme: str, variants: tuple[str, ...]) -> dict[str, dict]:
    """``{label: {"base_scheme", "variant"}}`` of what a run of ``scheme`` is evaluated as: the
    trained scheme itself, then each of ``variants`` that applies to it (:data:`VARIANTS`)."""
    labels = {scheme: {"base_scheme": scheme, "variant": None}}
    for variant in variants:
        if variant in VARIANTS.get(scheme, ()):
            labels[variant_label(scheme, variant)] = {"base_scheme": scheme, "variant": variant}
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
    if scheme == "rope":
        return rope_variant_model(state, variant, factor, model_config, train_length, device)
    raise ValueError(f"no inference-time variants are defined for scheme {scheme!r}; known: {sorted(VARIANTS)}")


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


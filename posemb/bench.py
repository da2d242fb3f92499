"""``posemb bench``: the speed and memory of posemb's hot paths next to their baselines, in one process.

Sections (``--sections``, default all):

* ``rope``: applying RoPE to q and k. posemb's fused kernel (in place, ``out=``, out of place)
  against Hugging Face transformers' ``apply_rotary_pos_emb``, torchtune's and
  rotary-embedding-torch's RoPE (each when installed), posemb's plain reference, and two floors:
  ``copy_`` into a preallocated buffer and a fresh allocation plus copy. posemb's CPU rows come
  twice: the eager chunked path (``posemb in place`` ...) and, unless ``--no-compiled``, the
  optional compiled one-pass kernel (``... (compiled)``), which the section builds or loads first
  (timed separately; a build takes tens of seconds once per machine). Targets use the faster of
  the two and say which. Then the "model step" rows: ``posemb.build("rope")``'s ``rotate`` and
  packed ``rotate_qkv_`` forward and backward on q, k as attention makes them (views of a packed
  projection that requires grad), against copying q, k and their gradients.
* ``relative``: Shaw, Transformer-XL and DeBERTa attention (the content site, forward, no grad):
  time and peak memory against plain causal SDPA and against a naive version that materialises
  the (Lq, Lk, head_dim) relative tensors; FIRE, forgetting gate and CoPE forward and forward +
  backward against causal SDPA, checked against their dense float64 forms.
* ``bias``: T5 and ALiBi attention (posemb's automatic path and the dense reference), Kerple,
  Sandwich and dynamic position bias (automatic path, checked against the dense one) against plain
  causal SDPA, forward and forward + backward.
* ``train``: training tokens/s of ``posemb.TransformerLM`` against x-transformers at the same size.
* ``step``: one training step (forward + backward + AdamW) of ``TransformerLM(256, 256, 2, 4)``
  with every registered scheme (``posemb.available()``), time at 2048 tokens and peak memory at
  4096, as ratios to NoPE's in the same run (``STEP_OPTIONS`` / ``STEP_SKIPPED`` say which schemes
  get options or are left out, and why).

Method: every implementation of one comparison is timed in the same process, in interleaved
rounds (so load from other processes hits all of them alike); the table reports medians and
ratios of medians measured in that run. Peak memory is the growth of the process's resident set
high-water mark during one call (Linux ``/proc``; freed heap is first returned with
``malloc_trim``), so it counts the call's own allocations, output included, not its inputs.
Ratios, shapes, dtypes, the torch version and the thread count go to a JSON file.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from posemb.lab.checkpoint import atomic_write_bytes
from posemb.lab.outdir import check_writable_file

SECTIONS = ("rope", "relative", "bias", "train", "step")


# ---- measuring ------------------------------------------------------------------------------------
def time_interleaved(functions: dict[str, Callable[..., Any]], repeats: int, warmup: int = 1,
                     prepare: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in ``repeats`` interleaved rounds.

    ``prepare`` (optional, by name): called before each call of that function, outside the timing;
    its result is the function's one argument (fresh inputs a call consumes, e.g. a tensor it
    rotates in place)."""
    prepare = prepare or {}

    def call(name, function):
        if name not in prepare:
            start = time.perf_counter()
            function()
            return time.perf_counter() - start
        argument = prepare[name]()
        start = time.perf_counter()
        function(argument)
        return time.perf_counter() - start

    for name, function in functions.items():
        for _ in range(warmup):
            call(name, function)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(call(name, function))
    return times


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def peak_memory_bytes(function: Callable[[], Any]) -> int | None:
    """Growth of the resident-set high-water mark during one call of ``function`` (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    result = function()
    peak = _status_kib("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _shape_text(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


# ---- RoPE -------------------------------------------------------------------------------------------
def _hf_apply_rotary():
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except Exception:
        return None
    return apply_rotary_pos_emb


def _torchtune_rope(head_dim: int, length: int):
    try:
        from torchtune.modules import RotaryPositionalEmbeddings
    except Exception:
        return None
    return RotaryPositionalEmbeddings(head_dim, max_seq_len=length)


def _rotary_embedding_torch(head_dim: int):
    try:
        from rotary_embedding_torch import RotaryEmbedding
    except Exception:
        return None
    return RotaryEmbedding(dim=head_dim)


def _load_compiled_rope() -> dict[str, Any]:
    """Build or load the compiled CPU RoPE kernel, timing it apart from everything else."""
    import warnings

    from posemb.kernels import rotary_compiled
    cached = rotary_compiled.is_built()
    was_loaded = rotary_compiled.loaded()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = rotary_compiled.load(build=True)
    return {"loaded": ok, "seconds": round(time.perf_counter() - started, 2),
            "how": "already loaded" if was_loaded else ("loaded from cache" if cached else "compiled"),
            "warning": "; ".join(str(w.message) for w in caught) or None}


def bench_rope(quick: bool, repeats: int, compiled: bool = True) -> dict[str, Any]:
    from posemb.kernels import rotary_compiled
    was_loaded = rotary_compiled.loaded()
    try:
        return _bench_rope(quick, repeats, compiled)
    finally:  # in-process callers keep their own selection: auto picks compiled only if they loaded it
        if not was_loaded:
            rotary_compiled.unload()


def _bench_rope(quick: bool, repeats: int, compiled: bool) -> dict[str, Any]:
    from posemb.functional.rope import apply_rotary as reference_rotary
    from posemb.functional.rope import rotary_cos_sin
    from posemb.kernels import apply_rotary_qk

    shapes = [(1, 8, 512, 64), (2, 4, 256, 32)] if quick else [(1, 32, 4096, 128), (8, 8, 1024, 64)]
    dtypes = [torch.float32, torch.bfloat16]
    hf_apply = _hf_apply_rotary()
    rows, notes = [], []
    compiled_info = _load_compiled_rope() if compiled else {"loaded": False, "how": "skipped (--no-compiled)"}
    if compiled_info["loaded"]:
        notes.append(f"compiled CPU kernel {compiled_info['how']} in {compiled_info['seconds']} s (not in any timing)")
    else:
        notes.append(f"compiled CPU kernel not timed: {compiled_info.get('warning') or compiled_info['how']}")
    if hf_apply is None:
        notes.append("transformers not installed: its apply_rotary_pos_emb skipped")
    for shape in shapes:
        batch, heads, length, head_dim = shape
        tune = _torchtune_rope(head_dim, length)
        ret = _rotary_embedding_torch(head_dim)
        if tune is None and "torchtune not installed: skipped" not in notes:
            notes.append("torchtune not installed: skipped")
        if ret is None and "rotary-embedding-torch not installed: skipped" not in notes:
            notes.append("rotary-embedding-torch not installed: skipped")
        positions = torch.arange(length)[None]
        inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        cos, sin = rotary_cos_sin(positions, inv_freq)  # (1, L, D/2) float32
        for dtype in dtypes:
            generator = torch.Generator().manual_seed(0)
            q = torch.randn(shape, generator=generator).to(dtype)
            k = torch.randn(shape, generator=generator).to(dtype)
            out_q, out_k = torch.empty_like(q), torch.empty_like(k)
            cos_hf = torch.cat((cos, cos), dim=-1).to(dtype)
            sin_hf = torch.cat((sin, sin), dim=-1).to(dtype)
            functions: dict[str, Callable[[], Any]] = {
                "copy floor (copy_ into buffers)": lambda: (out_q.copy_(q), out_k.copy_(k)),
                "alloc + copy (clone)": lambda: (q.clone(), k.clone()),
                # The eager chunked CPU path, named explicitly so loading the compiled kernel
                # (which auto would then pick) does not change what these rows measure.
                "posemb in place": lambda: apply_rotary_qk(q, k, cos, sin, inplace=True, backend="cpu"),
                "posemb out=": lambda: apply_rotary_qk(q, k, cos, sin, out=(out_q, out_k), backend="cpu"),
                "posemb out of place": lambda: apply_rotary_qk(q, k, cos, sin, backend="cpu"),
                "posemb in place, interleaved": lambda: apply_rotary_qk(q, k, cos, sin, inplace=True, interleaved=True,
                                                                        backend="cpu"),
                "posemb reference (functional)": lambda: (reference_rotary(q, cos, sin), reference_rotary(k, cos, sin)),
            }
            if compiled_info["loaded"]:
                functions.update({
                    "posemb in place (compiled)": lambda: apply_rotary_qk(q, k, cos, sin, inplace=True,
                                                                          backend="compiled"),
                    "posemb out= (compiled)": lambda: apply_rotary_qk(q, k, cos, sin, out=(out_q, out_k),
                                                                      backend="compiled"),
                    "posemb out of place (compiled)": lambda: apply_rotary_qk(q, k, cos, sin, backend="compiled"),
                    "posemb in place, interleaved (compiled)": lambda: apply_rotary_qk(
                        q, k, cos, sin, inplace=True, interleaved=True, backend="compiled"),
                })
            if hf_apply is not None:
                functions["transformers apply_rotary_pos_emb"] = lambda: hf_apply(q, k, cos_hf, sin_hf)
            if tune is not None:
                # torchtune wants (batch, seq, heads, head_dim); the transposes are views.
                functions["torchtune RotaryPositionalEmbeddings"] = lambda: (tune(q.transpose(1, 2)), tune(k.transpose(1, 2)))
            if ret is not None:
                functions["rotary-embedding-torch"] = lambda: (ret.rotate_queries_or_keys(q), ret.rotate_queries_or_keys(k))
            # Agreement check (outside the timing): posemb's fast path against transformers.
            max_diff = None
            if hf_apply is not None:
                expected_q, _ = hf_apply(q, k, cos_hf, sin_hf)
                got_q, _ = apply_rotary_qk(q, k, cos, sin)
                max_diff = float((got_q.float() - expected_q.float()).abs().max())
            times = time_interleaved(functions, repeats)
            floor = _median_ms(times["copy floor (copy_ into buffers)"])
            alloc = _median_ms(times["alloc + copy (clone)"])
            # Speed-ups are stated against posemb's fastest in-place path (compiled when loaded).
            inplace = min(_median_ms(times[name]) for name in ("posemb in place", "posemb in place (compiled)")
                          if name in times)
            for name, seconds in times.items():
                median = _median_ms(seconds)
                rows.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": name,
                             "median_ms": round(median, 3), "times_ms": [round(t * 1e3, 3) for t in seconds],
                             "x_floor": round(median / floor, 3), "x_alloc_copy": round(median / alloc, 3),
                             "x_posemb_inplace": round(median / inplace, 3)})
            rows[-1]["max_abs_diff_vs_transformers"] = max_diff
    model_rows = _rope_model_step_rows(shapes, dtypes, repeats, notes)
    return {"rows": rows, "model_rows": model_rows, "notes": notes, "compiled": compiled_info}


#: The model-step rows of the rope section (impl names; the table and the targets read them).
ROPE_STEP_FLOOR = "copy floor (q, k and their grads)"
ROPE_STEP_ROTATE = "rope.rotate (q, k views)"
ROPE_STEP_PACKED = "rope.rotate_qkv_ (packed, in place)"


def _rope_model_step_rows(shapes, dtypes, repeats: int, notes: list[str]) -> list[dict[str, Any]]:
    """RoPE as the model runs it, forward and backward, next to a copy floor, in one interleaved run.

    Inputs are built the way ``posemb.model.attention.MultiHeadAttention.forward`` builds them: a
    packed projection output ``qkv`` (batch, seq, 3 * heads * head_dim) that requires grad (a fresh
    ``clone()`` of a leaf per call, made outside the timing, so an in-place rotation has a non-leaf
    of its own), viewed as ``qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)`` and unbound into
    q, k, v: non-contiguous views, rows ``3 H D`` apart. A timed call is the rotation's forward plus
    ``torch.autograd.grad`` from fixed output gradients down to the rotation's inputs, captured as
    gradient edges before it ran (``torch.autograd.graph.get_gradient_edge``), so the backward
    stops there: nothing of the projection's or the unbind's backward is timed.

    * ``rope.rotate``: ``posemb.build("rope").rotate(q, k, positions, positions)`` on the views,
      gradients of both outputs down to q and k;
    * ``rope.rotate_qkv_``: the packed in-place path the model takes for plain RoPE
      (``rotates_packed``; ``grad_inplace=True`` as the model passes it) on ``qkv``, gradient of
      the rotated ``qkv`` (a fresh one per call, since the backward may rotate it in place) down
      to ``qkv`` before the rotation;
    * the floor: ``copy_`` of q and k (the same strided views) into preallocated buffers plus
      ``copy_`` of two (batch, heads, seq, head_dim) gradients into preallocated buffers.

    ``x_floor`` = a row's median / the floor's. Whatever ``rotate`` and ``rotate_qkv_`` do
    (fused kernels, in place, shared tables) is what these rows measure.
    """
    import posemb
    from torch.autograd.graph import get_gradient_edge

    from posemb.functional.rope import apply_rotary as reference_rotary
    from posemb.functional.rope import rotary_cos_sin

    rows = []
    for shape in shapes:
        batch, heads, length, head_dim = shape
        rope = posemb.build("rope", head_dim=head_dim)
        # What TransformerLM passes every layer: one arange expanded over the batch.
        positions = torch.arange(length)[None].expand(batch, length)
        for dtype in dtypes:
            generator = torch.Generator().manual_seed(1)
            leaf = torch.randn(batch, length, 3 * heads * head_dim, generator=generator).to(dtype).requires_grad_()
            grad_q, grad_k = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
            grad_qkv = torch.randn(leaf.shape, generator=generator).to(dtype)

            def views(qkv):
                q, k, _ = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
                return q, k

            def rotate(qkv):
                q, k = views(qkv)
                edges = (get_gradient_edge(q), get_gradient_edge(k))
                return torch.autograd.grad(rope.rotate(q, k, positions, positions), edges, (grad_q, grad_k))

            def packed(inputs):
                qkv, grad = inputs
                edge = get_gradient_edge(qkv)
                rotated = rope.rotate_qkv_(qkv, positions, heads=heads, grad_inplace=True)
                return torch.autograd.grad(rotated, edge, grad)

            detached_q, detached_k = views(leaf.detach())
            buffers = [torch.empty(shape, dtype=dtype) for _ in range(4)]

            def floor():
                buffers[0].copy_(detached_q), buffers[1].copy_(detached_k)
                buffers[2].copy_(grad_q), buffers[3].copy_(grad_k)

            functions: dict[str, Callable[..., Any]] = {ROPE_STEP_FLOOR: floor, ROPE_STEP_ROTATE: rotate}
            prepare: dict[str, Callable[[], Any]] = {ROPE_STEP_ROTATE: leaf.clone}
            if rope.rotates_packed:
                functions[ROPE_STEP_PACKED] = packed
                prepare[ROPE_STEP_PACKED] = lambda: (leaf.clone(), grad_qkv.clone())
            # Agreement (outside the timing): both paths against posemb's plain formula in float64
            # on the same (dtype-rounded) inputs, forward and gradient; bf16 is off by its rounding.
            where = f"{_shape_text(shape)} {str(dtype).replace('torch.', '')}"
            inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            cos, sin = rotary_cos_sin(positions[:1], inv_freq, dtype=torch.float64)
            q64, k64 = (t.double() for t in views(leaf.detach()))
            expected = (reference_rotary(q64, cos, sin), reference_rotary(k64, cos, sin),
                        reference_rotary(grad_q.double(), cos, -sin), reference_rotary(grad_k.double(), cos, -sin))
            qkv = leaf.detach().clone().requires_grad_()
            q, k = views(qkv)
            got = rope.rotate(q, k, positions, positions)
            got = (*got, *torch.autograd.grad(got, (q, k), (grad_q, grad_k)))
            diffs = [f"rotate {max(float((g.detach().double() - e).abs().max()) for g, e in zip(got, expected)):.1e}"]
            if rope.rotates_packed:
                qkv = leaf.detach().clone().requires_grad_()
                rotated = rope.rotate_qkv_(qkv * 1, positions, heads=heads)
                (grad,) = torch.autograd.grad(views(rotated), qkv, (grad_q, grad_k))
                got = (*views(rotated.detach()), *views(grad))
                diffs.append(f"rotate_qkv_ {max(float((g.detach().double() - e).abs().max()) for g, e in zip(got, expected)):.1e}")
            notes.append(f"model step {where}: max |posemb - float64 formula|, outputs and gradients: {', '.join(diffs)}")
            times = time_interleaved(functions, repeats, prepare=prepare)
            floor_ms = _median_ms(times[ROPE_STEP_FLOOR])
            for name, seconds in times.items():
                median = _median_ms(seconds)
                rows.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": name,
                             "median_ms": round(median, 3), "times_ms": [round(t * 1e3, 3) for t in seconds],
                             "x_floor": round(median / floor_ms, 3)})
    return rows


# ---- relative attention (content site) -------------------------------------------------------------
def _naive_relative_attention(scheme, q, k, v, positions) -> torch.Tensor:
    """The per-pair form each paper writes first: relative vectors materialised for every (i, j)."""
    from posemb.functional.relative import clipped_index, query_minus_key
    from posemb.model.attention import causal_mask

    name = scheme.name
    length, head_dim = q.shape[-2], q.shape[-1]
    distance = positions[0][None, :] - positions[0][:, None]  # j - i, (L, L)
    scores = q @ k.transpose(-1, -2)
    extra_values = None
    if name == "shaw":
        index = clipped_index(distance, scheme.max_relative_position)
        a_key = scheme.key_table[0][index]                                     # (L, L, d)
        a_value = scheme.value_table[0][index]
        scores = scores + torch.einsum("bhid,ijd->bhij", q, a_key)
    elif name == "transformer_xl":
        rel = query_minus_key(positions, positions)[0]                          # i - j
        table = scheme.relative_embeddings(torch.arange(-(length - 1), length))  # (H, 2L-1, d)
        r = table[:, rel + length - 1]                                         # (H, L, L, d)
        scores = scores + torch.einsum("bhid,hijd->bhij", q + scheme.position_bias[:, None, :], r)
        scores = scores + (k @ scheme.content_bias[:, :, None]).transpose(-1, -2)
    elif name == "deberta":
        index = scheme.relative_index(positions, positions)[0]                  # (L, L)
        key_r = scheme._projected(scheme.pos_key_proj, q.dtype)[:, index]       # (H, L, L, d)
        query_r = scheme._projected(scheme.pos_query_proj, q.dtype)[:, index]
        scores = scores + torch.einsum("bhid,hijd->bhij", q, key_r) + torch.einsum("bhjd,hijd->bhij", k, query_r)
    else:
        raise ValueError(f"no naive form for scheme {name!r}")
    scores = scores * scheme.logit_scale(head_dim)
    scores = scores.masked_fill(~causal_mask(length, length, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    if name == "shaw":
        extra_values = torch.einsum("bhij,ijd->bhid", probs, a_value)
        out = out + extra_values
    return out


def _relative_schemes(dim: int, heads: int):
    import posemb

    head_dim = dim // heads
    return {"shaw": posemb.build("shaw", head_dim=head_dim, num_heads=heads),
            "transformer_xl": posemb.build("transformer_xl", dim=dim, num_heads=heads),
            "deberta": posemb.build("deberta", dim=dim, num_heads=heads)}


#: Content-site schemes of the newer-schemes issue, measured forward and forward + backward at one
#: length against causal SDPA (their own rows: causal only, no naive (L, L, d) form in the paper).
NEWER_CONTENT_SCHEMES = ("fire", "forgetting", "cope")


def _newer_content_schemes(heads: int, head_dim: int) -> dict[str, Any]:
    """fire, forgetting and cope with non-trivial parameters (their initial ones make the gate
    constant and CoPE's term zero, which would hide a wrong block assembly)."""
    import posemb

    schemes = {"fire": posemb.build("fire", num_heads=heads),
               "forgetting": posemb.build("forgetting", head_dim=head_dim, num_heads=heads),
               "cope": posemb.build("cope", head_dim=head_dim, num_heads=heads)}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        schemes["forgetting"].gate_weight.copy_(0.1 * torch.randn(heads, head_dim, generator=generator))
        schemes["cope"].position_embedding.copy_(0.5 * torch.randn(schemes["cope"].npos, head_dim,
                                                                   generator=generator))
    return schemes


def _dense_content_reference(scheme, q, k, v, positions) -> torch.Tensor:
    """Causal attention with the scheme's whole (L, L) term, in float64, from each paper's formula:

    * FIRE (Li et al. 2023): ``softmax(q k^T / sqrt(d) + b(i, j))``, ``b`` the scheme's own
      ``fire_bias`` (the MLP of the normalised distance) for all pairs at once;
    * forgetting gate (Lin et al. 2025): ``+ D_ij = c_i - c_j``, ``c`` the cumulative sum of
      ``log sigmoid(w_h . k_t + b_h)`` (the scheme's ``log_forget_gates``);
    * CoPE (Golovneva et al. 2024, eq. 3-5): ``p_ij = sum_{t=j..i} sigmoid(q_i . k_t / sqrt(d))``
      clamped to ``npos - 1``, ``+ (1 - w) q_i . e[floor p] + w q_i . e[ceil p]``, ``w = p - floor p``.
    """
    from posemb.model.attention import causal_mask

    q, k, v = q.double(), k.double(), v.double()
    length = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    visible = causal_mask(length, length, q.device)
    if scheme.name == "fire":
        scores = scores + scheme.fire_bias(positions, positions).double()
    elif scheme.name == "forgetting":
        cumulative = scheme.log_forget_gates(k).double().cumsum(-1)
        scores = scores + cumulative[..., :, None] - cumulative[..., None, :]
    elif scheme.name == "cope":
        gates = torch.sigmoid(scores).masked_fill(~visible, 0.0)
        contextual = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=scheme.npos - 1)
        low = contextual.floor()
        weight = contextual - low
        per_position = q @ scheme.position_embedding.double().T                      # (B, H, L, npos)
        low_logits = per_position.gather(-1, low.long())
        high_logits = per_position.gather(-1, contextual.ceil().long())
        scores = scores + (1 - weight) * low_logits + weight * high_logits
    else:
        raise ValueError(f"no dense reference for scheme {scheme.name!r}")
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v


def _causal_rows(entries: dict[str, tuple[Any, str]], length: int, heads: int, head_dim: int,
                 repeats: int) -> list[dict[str, Any]]:
    """Forward (no grad) and forward + backward of ``attend`` against causal SDPA at one length
    (B=1, fp32), interleaved per mode. ``entries``: row label -> (scheme, ``bias_path``); rows with
    ``x_sdpa_causal``. The same q, k, v (seed 0) and output gradient for every entry."""
    from posemb.model.attention import attend

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    grad = torch.randn(1, heads, length, head_dim, generator=generator)
    positions = torch.arange(length)[None]

    def forward(scheme=None, path="auto"):
        def run():
            with torch.no_grad():
                if scheme is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return attend(q, k, v, scheme, positions, positions, causal=True, bias_path=path)
        return run

    def forward_backward(scheme=None, path="auto"):
        def run():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            if scheme is None:
                out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
            else:
                out = attend(qq, kk, vv, scheme, positions, positions, causal=True, bias_path=path)
            out.backward(grad)
            if scheme is not None:
                scheme.zero_grad(set_to_none=True)
        return run

    rows = []
    for mode, make in (("forward", forward), ("forward+backward", forward_backward)):
        functions = {"plain SDPA (causal)": make()}
        functions.update({label: make(scheme, path) for label, (scheme, path) in entries.items()})
        times = time_interleaved(functions, repeats)
        base = _median_ms(times["plain SDPA (causal)"])
        for name, seconds in times.items():
            median = _median_ms(seconds)
            rows.append({"mode": mode, "length": length, "shape": [1, heads, length, head_dim], "dtype": "float32",
                         "impl": name, "median_ms": round(median, 3), "times_ms": [round(t * 1e3, 3) for t in seconds],
                         "x_sdpa_causal": round(median / base, 3)})
    return rows


def bench_relative(quick: bool, repeats: int) -> dict[str, Any]:
    from posemb.model.attention import attend

    heads, head_dim = 8, 64
    long_length, naive_length = (512, 128) if quick else (4096, 512)
    schemes = _relative_schemes(heads * head_dim, heads)
    rows, notes = [], []
    notes.append(f"naive versions run at L={naive_length} only: at L={long_length} their (H, L, L, d) tensors "
                 f"would need {heads * long_length ** 2 * head_dim * 4 / 2 ** 30:.0f} GiB each")
    for length in (long_length, naive_length):
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
        positions = torch.arange(length)[None]
        functions: dict[str, Callable[[], Any]] = {
            "plain SDPA (causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, scheme in schemes.items():
            functions[f"{name} (posemb)"] = (lambda s=scheme: attend(q, k, v, s, positions, positions, causal=True))
            if length == naive_length:
                functions[f"{name} (naive)"] = (lambda s=scheme: _naive_relative_attention(s, q, k, v, positions))
        with torch.no_grad():
            for name, scheme in schemes.items():
                if length == naive_length:
                    fast = attend(q, k, v, scheme, positions, positions, causal=True)
                    naive = _naive_relative_attention(scheme, q, k, v, positions)
                    notes.append(f"{name}: max |posemb - naive| = {float((fast - naive).abs().max()):.2e} at L={length}")
            times = time_interleaved(functions, repeats)
            memory = {name: peak_memory_bytes(function) for name, function in functions.items()}
        base_time = _median_ms(times["plain SDPA (causal)"])
        base_memory = memory["plain SDPA (causal)"]
        for name, seconds in times.items():
            median = _median_ms(seconds)
            peak = memory[name]
            rows.append({"length": length, "shape": [1, heads, length, head_dim], "dtype": "float32", "impl": name,
                         "median_ms": round(median, 3), "times_ms": [round(t * 1e3, 3) for t in seconds],
                         "x_sdpa_time": round(median / base_time, 3),
                         "peak_mib": None if peak is None else round(peak / 2 ** 20, 2),
                         "x_sdpa_memory": None if not (peak and base_memory) else round(peak / base_memory, 2)})
    # The newer content-site schemes: forward and forward + backward against causal SDPA, and
    # agreement with their dense float64 forms at the naive length.
    newer = _newer_content_schemes(heads, head_dim)
    causal_length = 256 if quick else 2048
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, naive_length, head_dim, generator=generator) for _ in range(3))
    positions = torch.arange(naive_length)[None]
    with torch.no_grad():
        for name, scheme in newer.items():
            fast = attend(q, k, v, scheme, positions, positions, causal=True)
            dense = _dense_content_reference(scheme, q, k, v, positions)
            notes.append(f"{name}: max |posemb - dense float64| = {float((fast.double() - dense).abs().max()):.2e} "
                         f"at L={naive_length}")
    causal_rows = _causal_rows({f"{name} (posemb)": (scheme, "auto") for name, scheme in newer.items()},
                               causal_length, heads, head_dim, repeats)
    return {"rows": rows, "causal_rows": causal_rows, "notes": notes}


# ---- bias site (T5, ALiBi) ------------------------------------------------------------------------
#: Bias-site schemes of the newer-schemes issue, timed on the automatic path next to T5 and ALiBi.
NEWER_BIAS_SCHEMES = ("kerple", "sandwich", "dynamic_position_bias")

def bench_bias(quick: bool, repeats: int) -> dict[str, Any]:
    import posemb
    from posemb.model.attention import attend
    from posemb.registry import build_for_model

    heads, head_dim = 8, 64
    length = 512 if quick else 2048
    t5 = posemb.build("t5", num_heads=heads)
    torch.nn.init.normal_(t5.bias.weight)
    alibi = posemb.build("alibi", num_heads=heads)
    # The newer bias schemes (defaults; DPB's MLP is randomly initialised at build, seed 0), on the
    # automatic path only, their dense form checked below. Built as a model of width H * d would
    # build them (Sandwich's sinusoid takes the model width).
    torch.manual_seed(0)
    context = {"dim": heads * head_dim, "num_heads": heads, "head_dim": head_dim, "causal": True}
    newer = {name: build_for_model(name, context=context, options={}) for name in NEWER_BIAS_SCHEMES}
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    positions = torch.arange(length)[None]
    notes = []
    for name, scheme in (("t5", t5), ("alibi", alibi), *newer.items()):
        with torch.no_grad():
            fast = attend(q, k, v, scheme, positions, positions, causal=True)
            dense = attend(q, k, v, scheme, positions, positions, causal=True, bias_path="dense")
        notes.append(f"{name}: max |auto - dense| = {float((fast - dense).abs().max()):.2e}")
    entries = {}
    for name, scheme in (("t5", t5), ("alibi", alibi)):
        entries[f"{name} (posemb auto)"] = (scheme, "auto")
        entries[f"{name} (dense bias, reference)"] = (scheme, "dense")
    entries.update({f"{name} (posemb auto)": (scheme, "auto") for name, scheme in newer.items()})
    rows = _causal_rows(entries, length, heads, head_dim, repeats)
    return {"rows": rows, "notes": notes}


# ---- training throughput ---------------------------------------------------------------------------
def bench_train(quick: bool, repeats: int) -> dict[str, Any]:
    import posemb

    vocab = 256
    if quick:
        dim, depth, heads, batch, length, steps = 64, 2, 2, 4, 128, 3
    else:
        dim, depth, heads, batch, length, steps = 256, 4, 4, 8, 512, max(5, repeats)
    rows, notes = [], []
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps + 1, batch, length + 1), generator=generator)

    def posemb_model(scheme):
        torch.manual_seed(0)
        return posemb.TransformerLM(vocab, dim=dim, depth=depth, heads=heads, scheme=scheme)

    def x_transformers_model(scheme):
        try:
            from x_transformers import Decoder, TransformerWrapper
        except Exception:
            return None
        torch.manual_seed(0)
        options = {"rope": {"rotary_pos_emb": True}, "alibi": {"alibi_pos_bias": True}}[scheme]
        return TransformerWrapper(num_tokens=vocab, max_seq_len=length, tie_embedding=True,
                                  attn_layers=Decoder(dim=dim, depth=depth, heads=heads, attn_flash=True, **options))

    candidates = []
    for scheme in ("rope", "alibi"):
        candidates.append((f"posemb TransformerLM ({scheme})", scheme, posemb_model(scheme)))
        other = x_transformers_model(scheme)
        if other is None:
            notes.append("x-transformers not installed: skipped")
        else:
            candidates.append((f"x-transformers ({scheme})", scheme, other))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, _, model in candidates}

    def step_function(name, model):
        state = {"index": 0}

        def step():
            batch_tokens = data[state["index"] % len(data)]
            state["index"] += 1
            logits = model(batch_tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), batch_tokens[:, 1:].reshape(-1))
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return step

    functions = {name: step_function(name, model) for name, _, model in candidates}
    times = time_interleaved(functions, steps, warmup=2)
    tokens = batch * length
    reference = {scheme: statistics.median(times[f"x-transformers ({scheme})"])
                 for scheme in ("rope", "alibi") if f"x-transformers ({scheme})" in times}
    for name, scheme, model in candidates:
        median = statistics.median(times[name])
        rows.append({"impl": name, "scheme": scheme, "dim": dim, "depth": depth, "heads": heads, "batch": batch,
                     "length": length, "dtype": "float32", "parameters": sum(p.numel() for p in model.parameters()),
                     "median_step_ms": round(median * 1e3, 2), "tokens_per_s": round(tokens / median, 1),
                     "step_times_ms": [round(t * 1e3, 2) for t in times[name]],
                     "x_xtransformers_tokens_per_s": (round(reference[scheme] / median, 3)
                                                      if scheme in reference else None)})
    return {"rows": rows, "notes": notes}


# ---- training step of every registered scheme ------------------------------------------------------
#: The step section's model: ``posemb.TransformerLM(STEP_MODEL["vocab_size"], dim, depth, heads)``.
STEP_MODEL = {"vocab_size": 256, "dim": 256, "depth": 2, "heads": 4}
#: (timed length, peak-memory length): full run, and ``--quick``.
STEP_LENGTHS = {"full": (2048, 4096), "quick": (64, 128)}
#: Timed rounds when ``--repeats`` is not given: every round runs one step of every scheme (about
#: 25 s on 2 quiet cores at 2048 tokens, several minutes on an oversubscribed machine), so the
#: section keeps to a few rounds.
STEP_REPEATS = 3
#: Schemes whose defaults cannot run the step as is: ``name -> (options for a memory length, why)``.
#: Every other registered scheme runs with its defaults, so a new scheme is covered without an edit.
STEP_OPTIONS: dict[str, tuple[Callable[[int], dict[str, Any]], str]] = {
    "learned": (lambda length: {"max_positions": length},
                "its table holds max_positions=1024 rows by default (beyond them: an error); "
                "the step needs one per position up to the memory length"),
}
#: Schemes the step leaves out: ``name -> why`` (listed in the table, the notes and the targets).
STEP_SKIPPED: dict[str, str] = {}


def _train_step(model, optimizer, batch: torch.Tensor) -> torch.Tensor:
    """One language-model training step on ``batch`` (batch, length + 1): next-token cross-entropy,
    backward, AdamW step, gradients cleared. Returns the loss (detached)."""
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bench_step(quick: bool, repeats: int | None) -> dict[str, Any]:
    """Training step (forward + backward + AdamW) of ``TransformerLM(256, 256, 2, 4)`` with every
    registered scheme on one sequence, time and peak memory, each as a ratio to NoPE's in this run.

    One model per scheme, built after ``torch.manual_seed(0)``, one AdamW each, the same tokens for
    all. Two warm-up steps per scheme (the first also checks that the step runs; ``quick``: only
    that one), then
    ``repeats`` interleaved rounds of one step per scheme at the timed length. Then, in the same
    order, the peak memory (``peak_memory_bytes``) of one step at the memory length, on the same
    model and optimizer (the AdamW state exists already, so the figure is the step's own
    activations, gradients and temporaries). A scheme that fails to build or to step is reported
    with its error, never dropped.
    """
    import posemb

    time_length, memory_length = STEP_LENGTHS["quick" if quick else "full"]
    repeats = repeats or STEP_REPEATS
    vocab = STEP_MODEL["vocab_size"]
    tokens = torch.randint(0, vocab, (1, memory_length + 1), generator=torch.Generator().manual_seed(0))
    short = tokens[:, :time_length + 1].contiguous()
    notes: list[str] = []
    failed: dict[str, str] = {}
    skipped = {name: reason for name, reason in STEP_SKIPPED.items() if name in posemb.available()}
    runs: dict[str, dict[str, Any]] = {}
    for name in posemb.available():
        if name in skipped:
            continue
        options, why = (STEP_OPTIONS[name][0](memory_length), STEP_OPTIONS[name][1]) if name in STEP_OPTIONS \
            else ({}, None)
        try:
            torch.manual_seed(0)
            model = posemb.TransformerLM(vocab, STEP_MODEL["dim"], STEP_MODEL["depth"], STEP_MODEL["heads"],
                                         scheme=name, **options)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            first_loss = float(_train_step(model, optimizer, short))  # warm-up 1, and the check that it runs
        except Exception as error:  # reported as a failed scheme (table, notes, a NOT met target)
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        runs[name] = {"model": model, "optimizer": optimizer, "options": options, "why": why,
                      "first_loss": first_loss}
        if why:
            notes.append(f"{name}: options {options} ({why})")
        if model.position_layout != "batch seq":
            notes.append(f"{name}: reads {model.position_axes} coordinates per token ({model.position_layout}); "
                         f"TransformerLM's default positions give every axis the token index (t = h = w)")
    if "nope" not in runs:
        raise RuntimeError(f"the step section's baseline, nope, did not run: "
                           f"{failed.get('nope') or skipped.get('nope') or 'not registered'}")

    def stepper(run, batch):
        return lambda: _train_step(run["model"], run["optimizer"], batch)

    # The check step above was warm-up 1; a second one (full runs only: quick keeps CI fast).
    times = time_interleaved({name: stepper(run, short) for name, run in runs.items()}, repeats,
                             warmup=0 if quick else 1)
    memory: dict[str, int | None] = {}
    for name, run in list(runs.items()):
        try:
            memory[name] = peak_memory_bytes(stepper(run, tokens))
        except Exception as error:
            failed[name] = f"memory step at {memory_length} tokens: {type(error).__name__}: {error}"
            memory[name] = None
    base_time = statistics.median(times["nope"])
    base_memory = memory["nope"]
    rows = []
    for name, run in runs.items():
        median = statistics.median(times[name])
        peak = memory[name]
        model = run["model"]
        rows.append({"scheme": name, "site": "input" if model.input_scheme is not None else
                     ("none" if not model.schemes else model.schemes[0].site),
                     "options": {key: repr(value) for key, value in run["options"].items()},
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "time_length": time_length, "memory_length": memory_length, "dtype": "float32",
                     "first_loss": round(run["first_loss"], 4),
                     "median_step_ms": round(median * 1e3, 2), "step_times_ms": [round(t * 1e3, 2) for t in times[name]],
                     "x_nope_time": round(median / base_time, 3),
                     "peak_mib": None if peak is None else round(peak / 2 ** 20, 1),
                     "x_nope_memory": None if not (peak and base_memory) else round(peak / base_memory, 3)})
    for name, reason in skipped.items():
        notes.append(f"{name}: skipped ({reason})")
    for name, reason in failed.items():
        notes.append(f"{name}: FAILED ({reason})")
    return {"rows": rows, "skipped": skipped, "failed": failed, "notes": notes, "repeats": repeats,
            "model": dict(STEP_MODEL), "batch": 1, "time_length": time_length, "memory_length": memory_length}


# ---- targets, table, JSON --------------------------------------------------------------------------
def _targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []

    def add(name, value, comparison, bound, detail, met=None):
        if value is not None:  # ``met`` given: a verdict without a value (a scheme that failed)
            met = value <= bound if comparison == "<=" else value >= bound
        targets.append({"name": name, "value": None if value is None else round(value, 3),
                        "target": f"{comparison} {bound}", "met": met, "detail": detail})

    rope = sections.get("rope")
    if rope:
        groups: dict[tuple, dict[str, dict]] = {}
        for row in rope["rows"]:
            groups.setdefault((tuple(row["shape"]), row["dtype"]), {})[row["impl"]] = row

        def best(impls, name):
            """posemb's faster path for one mode: (row, 'compiled' or 'eager')."""
            choices = [(impls[name], "eager")]
            if f"{name} (compiled)" in impls:
                choices.append((impls[f"{name} (compiled)"], "compiled"))
            return min(choices, key=lambda choice: choice[0]["median_ms"])

        for (shape, dtype), impls in groups.items():
            where = f"{_shape_text(shape)} {dtype}"
            row, path = best(impls, "posemb in place")
            add(f"rope in place / copy floor, {where}", row["x_floor"], "<=", 1.3, f"q and k; {path} path")
            row, path = best(impls, "posemb out=")
            add(f"rope out= / copy floor, {where}", row["x_floor"], "<=", 1.3, f"q and k; {path} path")
            if "transformers apply_rotary_pos_emb" in impls:
                _, path = best(impls, "posemb in place")
                add(f"transformers / posemb in place, {where}",
                    impls["transformers apply_rotary_pos_emb"]["x_posemb_inplace"], ">=", 5.0, f"speed-up; {path} path")
            row, path = best(impls, "posemb out of place")
            add(f"rope out of place / (alloc + copy), {where}", row["x_alloc_copy"], "<=", 1.0,
                f"one allocation plus copy; {path} path")
        for row in rope.get("model_rows", []):
            if row["impl"] != ROPE_STEP_FLOOR:
                add(f"rope model step {row['impl'].split(' (')[0]} / floor, {_shape_text(row['shape'])} {row['dtype']}",
                    row["x_floor"], "<=", 1.3, "forward + backward as attention runs it; floor: copy_ of q, k "
                    "and of their two gradients")
    relative = sections.get("relative")
    if relative:
        longest = max(row["length"] for row in relative["rows"])
        for row in relative["rows"]:
            if row["length"] == longest and row["impl"].endswith("(posemb)"):
                add(f"{row['impl']} peak memory / SDPA, L={longest}", row["x_sdpa_memory"], "<=", 2.0, "forward, no grad")
                add(f"{row['impl']} time / SDPA, L={longest}", row["x_sdpa_time"], "<=", 1.5, "forward, no grad")
        for row in relative.get("causal_rows", []):
            if row["mode"] == "forward" and row["impl"].endswith("(posemb)"):
                add(f"{row['impl']} time / causal SDPA, L={row['length']}", row["x_sdpa_causal"], "<=", 1.5,
                    "forward, no grad; the content site's bound (stated at L=4096 for shaw/transformer_xl/deberta)")
    bias = sections.get("bias")
    if bias:
        for row in bias["rows"]:
            if row["mode"] == "forward" and row["impl"].endswith("(posemb auto)"):
                add(f"{row['impl']} time / causal SDPA, L={row['length']}", row["x_sdpa_causal"], "<=", 1.3, "forward")
            if row["mode"] == "forward+backward" and row["impl"].endswith("(posemb auto)"):
                add(f"{row['impl']} fwd+bwd / causal SDPA, L={row['length']}", row["x_sdpa_causal"], "<=", 1.25,
                    "forward + backward")
    train = sections.get("train")
    if train:
        for row in train["rows"]:
            if row["impl"].startswith("posemb") and row["x_xtransformers_tokens_per_s"] is not None:
                add(f"{row['impl']} tokens/s / x-transformers", row["x_xtransformers_tokens_per_s"], ">=", 1.3,
                    f"dim {row['dim']}, depth {row['depth']}, batch {row['batch']}x{row['length']}")
    step = sections.get("step")
    if step:
        by_scheme = {row["scheme"]: row for row in step["rows"]}
        for name in sorted(set(by_scheme) | set(step["failed"]) | set(step["skipped"])):
            if name == "nope":
                continue  # the baseline: 1.0 by definition
            row = by_scheme.get(name, {})
            failed, skipped = step["failed"].get(name), step["skipped"].get(name)
            why = f"; FAILED: {failed}" if failed else f"; skipped: {skipped}" if skipped else ""
            add(f"step {name} time / nope, L={step['time_length']}", row.get("x_nope_time"), "<=", 1.5,
                f"forward + backward + AdamW{why}", met=False if failed else None)
            add(f"step {name} peak memory / nope, L={step['memory_length']}", row.get("x_nope_memory"), "<=", 1.5,
                f"one step{why}", met=False if failed else None)
    return targets


def format_table(results: dict[str, Any]) -> str:
    lines = [f"posemb bench  torch {results['torch']}  threads {results['threads']}  "
             f"{'quick' if results['quick'] else 'full'}  repeats {results['repeats']}"]
    sections = results["sections"]
    if "rope" in sections:
        lines.append("\nRoPE on q and k (median ms; x floor = / copy_ into buffers)")
        lines.append(f"{'shape':<18}{'dtype':<10}{'implementation':<42}{'ms':>10}{'x floor':>9}{'x alloc':>9}")
        for row in sections["rope"]["rows"]:
            lines.append(f"{_shape_text(row['shape']):<18}{row['dtype']:<10}{row['impl']:<42}{row['median_ms']:>10.2f}"
                         f"{row['x_floor']:>9.2f}{row['x_alloc_copy']:>9.2f}")
    if sections.get("rope", {}).get("model_rows"):
        lines.append("\nRoPE model step: forward + backward on attention's q, k views of a packed projection (median ms)")
        lines.append("  (backward down to the rotation's inputs; floor = copy_ of q and k into buffers + copy_ of "
                     "their two gradients)")
        lines.append(f"{'shape':<18}{'dtype':<10}{'implementation':<42}{'ms':>10}{'x floor':>9}")
        for row in sections["rope"]["model_rows"]:
            lines.append(f"{_shape_text(row['shape']):<18}{row['dtype']:<10}{row['impl']:<42}{row['median_ms']:>10.2f}"
                         f"{row['x_floor']:>9.2f}")
    if "relative" in sections:
        lines.append("\nRelative attention, content site, forward, no grad (B=1, H=8, d=64, causal, fp32)")
        lines.append(f"{'L':<7}{'implementation':<32}{'ms':>10}{'x SDPA':>9}{'peak MiB':>10}{'x SDPA mem':>12}")
        for row in sections["relative"]["rows"]:
            peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
            ratio = "n/a" if row["x_sdpa_memory"] is None else f"{row['x_sdpa_memory']:.2f}"
            lines.append(f"{row['length']:<7}{row['impl']:<32}{row['median_ms']:>10.1f}{row['x_sdpa_time']:>9.2f}"
                         f"{peak:>10}{ratio:>12}")
    if sections.get("relative", {}).get("causal_rows"):
        lines.append("\nNewer content-site schemes against causal SDPA (B=1, H=8, d=64, fp32)")
        lines.append(f"{'mode':<18}{'L':<7}{'implementation':<34}{'ms':>10}{'x causal SDPA':>15}")
        for row in sections["relative"]["causal_rows"]:
            lines.append(f"{row['mode']:<18}{row['length']:<7}{row['impl']:<34}{row['median_ms']:>10.1f}"
                         f"{row['x_sdpa_causal']:>15.2f}")
    if "bias" in sections:
        lines.append("\nBias site (B=1, H=8, d=64, causal, fp32)")
        lines.append(f"{'mode':<18}{'L':<7}{'implementation':<34}{'ms':>10}{'x causal SDPA':>15}")
        for row in sections["bias"]["rows"]:
            lines.append(f"{row['mode']:<18}{row['length']:<7}{row['impl']:<34}{row['median_ms']:>10.1f}"
                         f"{row['x_sdpa_causal']:>15.2f}")
    if "train" in sections:
        lines.append("\nTraining throughput (fp32, AdamW)")
        lines.append(f"{'implementation':<34}{'params':>10}{'step ms':>10}{'tokens/s':>11}{'x x-transformers':>18}")
        for row in sections["train"]["rows"]:
            ratio = "" if row["x_xtransformers_tokens_per_s"] is None else f"{row['x_xtransformers_tokens_per_s']:.2f}"
            lines.append(f"{row['impl']:<34}{row['parameters']:>10}{row['median_step_ms']:>10.1f}"
                         f"{row['tokens_per_s']:>11.0f}{ratio:>18}")
    if "step" in sections:
        step = sections["step"]
        model = step["model"]
        lines.append(f"\nTraining step, every registered scheme: TransformerLM(vocab {model['vocab_size']}, dim "
                     f"{model['dim']}, depth {model['depth']}, heads {model['heads']}), forward + backward + AdamW, "
                     f"one sequence, fp32; time at {step['time_length']} tokens (median of {step['repeats']}), "
                     f"peak memory of one step at {step['memory_length']}")
        lines.append(f"{'scheme':<24}{'site':<10}{'params':>10}{'step ms':>11}{'x nope':>8}{'peak MiB':>10}"
                     f"{'x nope mem':>12}")
        for row in sorted(step["rows"], key=lambda row: row["x_nope_time"]):
            peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
            ratio = "n/a" if row["x_nope_memory"] is None else f"{row['x_nope_memory']:.2f}"
            lines.append(f"{row['scheme']:<24}{row['site']:<10}{row['parameters']:>10}{row['median_step_ms']:>11.1f}"
                         f"{row['x_nope_time']:>8.2f}{peak:>10}{ratio:>12}")
        for name, reason in {**step["skipped"], **step["failed"]}.items():
            label = "skipped" if name in step["skipped"] else "FAILED"
            lines.append(f"{name:<24}{label}: {reason}")
    for name, section in sections.items():
        for note in section.get("notes", []):
            lines.append(f"note ({name}): {note}")
    if results["targets"]:
        lines.append("\nTargets")
        for target in results["targets"]:
            met = {True: "met", False: "NOT met", None: "n/a (quick)" if results["quick"] else "n/a"}[target["met"]]
            path = next((part.strip() for part in target["detail"].split(";") if part.strip().endswith(" path")), "")
            lines.append(f"  {target['name']:<62} {str(target['value']):>8}  target {target['target']:<7} {met}"
                         + (f"  ({path})" if path else ""))
    return "\n".join(lines)


def run(sections: list[str], *, quick: bool = False, repeats: int | None = None,
        compiled: bool = True) -> dict[str, Any]:
    """Run the chosen sections and return the results (what ``--output`` writes as JSON)."""
    from posemb import __version__

    given = repeats
    repeats = repeats or (5 if quick else 7)
    runners = {"rope": bench_rope, "relative": bench_relative, "bias": bench_bias, "train": bench_train}
    started = time.perf_counter()
    results: dict[str, Any] = {
        "posemb": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "quick": quick, "repeats": repeats, "sections": {},
    }
    for section in sections:
        if section == "rope":
            results["sections"][section] = bench_rope(quick, repeats, compiled=compiled)
        elif section == "step":  # its own default: every round is one step of every scheme
            results["sections"][section] = bench_step(quick, given)
        else:
            results["sections"][section] = runners[section](quick, repeats)
    results["targets"] = _targets(results["sections"])
    if quick:
        # The targets are stated for the full shapes; quick shapes are too small to judge them.
        # A scheme that failed stays NOT met.
        for target in results["targets"]:
            if target["value"] is not None:
                target["met"] = None
            target["detail"] += "; quick shapes: indicative only, rerun without --quick"
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _sections_argument(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections must be a comma-separated subset of {', '.join(SECTIONS)}, "
                                         f"got {text!r}")
    return chosen


def _handle(args: argparse.Namespace) -> int:
    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise ValueError(f"--threads must be in 1..4096, got {args.threads}")
    if args.repeats is not None and not 1 <= args.repeats <= 1000:
        raise ValueError(f"--repeats must be >= 1 and <= 1000, got {args.repeats}")
    check_writable_file(args.output, "--output")  # before minutes of measuring, not after
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = run(args.sections, quick=args.quick, repeats=args.repeats, compiled=not args.no_compiled)
    finally:  # a caller in the same process (tests, notebooks) keeps its own setting
        torch.set_num_threads(previous_threads)
    print(format_table(results))
    atomic_write_bytes(args.output, (json.dumps(results, indent=1) + "\n").encode("utf-8"))
    print(f"\nwrote {args.output} ({results['seconds']} s)")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time posemb's fast paths against their baselines (table + JSON)",
        description=__doc__.split("\n\n")[0] + " Prints a table and writes JSON with the ratios.")
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute (what CI runs)")
    parser.add_argument("--sections", type=_sections_argument, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all). step trains "
                             "every registered scheme: about 2.5 minutes on 2 quiet CPU cores (30 on an "
                             "oversubscribed machine), well under a minute with --quick")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per comparison (default 7, quick 5; step: {STEP_REPEATS}, one round "
                             "is a step of every scheme)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    parser.add_argument("--no-compiled", action="store_true",
                        help="rope: do not build/load the optional compiled CPU kernel (eager rows only)")
    parser.add_argument("--output", default="posemb-bench.json", help="where to write the JSON (default: %(default)s)")
    parser.set_defaults(handler=_handle)

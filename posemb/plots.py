"""Pictures of RoPE's frequencies (``posemb plot ...``): each is a function returning a matplotlib ``Figure``.

=========== ==================================================================================
name        picture
=========== ==================================================================================
cosine      ``cos(position * theta_j)`` against the token index for fast and slow pairs (the
            study notes' picture of RoPE's "wavelength by region")
llama3      original and Llama 3.1-scaled wavelength per pair, high / medium / low bands
            shaded, the two wavelength thresholds marked (Meta's ``apply_scaling``;
            ``_compute_llama3_parameters`` in transformers' ``modeling_rope_utils.py``)
schedules   every posemb ``rope_type``'s wavelengths and stretch per pair at one config
decay       RoPE's long-term decay: ``(1/(d/2)) sum_j |S_j|``, ``S_j = sum_{k<j} e^{i r theta_k}``
            against the relative distance ``r`` (Su et al. 2021, arXiv 2104.09864, §3.4.3, Fig. 2)
=========== ==================================================================================

Figures are built on matplotlib's object API with the Agg canvas attached explicitly
(:func:`posemb.lab.figures.new_figure`), so this module never touches ``pyplot``'s global state or
the user's interactive backend. The data behind each picture is available from a separate
function (``cosine_curves``, ``llama3_data``, ``schedule_data``, ``rope_decay_bound``) so it can
be checked without reading pixels. Sizes are bounded (:data:`MAX_POINTS`, :data:`MAX_HEAD_DIM`):
a picture of more points than pixels shows nothing more, and a typo must not exhaust memory.

``posemb plot NAME --out FILE`` replaces ``FILE``, which the user named; ``posemb plot all
--out-dir DIR`` writes ``DIR/NAME.png`` and, like the study, never replaces a file there that
posemb did not write (or wrote at another ``--dpi``) without ``--force``
(:class:`posemb.lab.outdir.OutputDir`). Both check that they can write before drawing.
"""
from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from posemb._validation import check_choice, check_even, check_float, check_int
from posemb.lab.figures import new_figure
from posemb.lab.outdir import OutputDir, check_writable_file

PLOT_NAMES = ("cosine", "llama3", "schedules", "decay")
SAVE_FORMATS = (".png", ".pdf", ".svg")
DEFAULT_DPI = 100
#: At most this many positions or distances along a picture's x axis (far more than its pixels).
MAX_POINTS = 100_000
#: At most this head dimension (the largest published models use 128-256).
MAX_HEAD_DIM = 8192
#: At most this many curves (pairs, bases) in one picture.
MAX_CURVES = 64

# Llama 3.1 8B's rope_parameters (HF config.json) and base (Llama 3 paper, arXiv 2407.21783, §3.2).
LLAMA31_8B = {"base": 500000.0, "head_dim": 128, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

__all__ = ["PLOT_NAMES", "LLAMA31_8B", "cosine_curves", "plot_cosine", "llama3_data", "plot_llama3",
           "schedule_data", "plot_schedules", "rope_decay_bound", "plot_decay", "save_figure", "plot_all",
           "add_parser"]


def _new_figure(width: float, height: float):
    return new_figure(width, height, layout="constrained")


def _check_head_dim(head_dim: int) -> int:
    check_even("head_dim", head_dim)
    return check_int("head_dim", head_dim, maximum=MAX_HEAD_DIM)


def _ranges(mask: Tensor) -> list[tuple[int, int]]:
    """Inclusive (first, last) index ranges of the True runs in a 1-D boolean mask."""
    runs, start = [], None
    values = mask.tolist()
    for index, value in enumerate(values + [False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index - 1))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------
# (a) cosine: fast pairs carry local position, slow pairs global position
# ---------------------------------------------------------------------------------------------
def _tokens_text(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _default_pairs(head_dim: int) -> tuple[list[int], list[int]]:
    half = head_dim // 2
    fast = sorted({0, head_dim // 16, head_dim // 8})
    slow = sorted({head_dim // 4, (3 * head_dim) // 8, half - 1})
    return fast, slow


def cosine_curves(*, base: float = 10000.0, head_dim: int = 128, length: int = 256,
                  pairs: Sequence[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """``positions`` (length,) and ``{j: cos(positions * theta_j)}`` in float64, with
    ``theta_j = base^(-2j/head_dim)`` (RoPE, Su et al. Eq. 15). Default pairs: three fast ones
    and three slow ones spread over ``0 .. head_dim/2 - 1``."""
    from posemb.functional.rope_schedules import default_inv_freq

    _check_head_dim(head_dim)
    check_int("length", length, minimum=2, maximum=MAX_POINTS)
    inv_freq = default_inv_freq(head_dim, check_float("base", base))
    if pairs is None:
        fast, slow = _default_pairs(head_dim)
        pairs = fast + slow
    pairs = [check_int("pairs[]", j, minimum=0, maximum=head_dim // 2 - 1) for j in pairs]
    if not pairs:
        raise ValueError("pairs must name at least one pair index, got an empty list")
    if len(pairs) > MAX_CURVES:
        raise ValueError(f"pairs must name at most {MAX_CURVES} pair indices, got {len(pairs)}")
    positions = torch.arange(length, dtype=torch.float64)
    return positions, {j: torch.cos(positions * inv_freq[j]) for j in pairs}


def plot_cosine(*, base: float = 10000.0, head_dim: int = 128, length: int = 256,
                pairs: Sequence[int] | None = None):
    """The study notes' picture: ``cos(position * theta_j)`` against the token index. Fast (short
    wavelength) pairs change a lot between neighbours and carry local position; slow pairs barely
    move and carry global position. Default: one panel each; with ``pairs`` given, one panel."""
    from posemb.functional.rope_schedules import default_inv_freq, wavelengths

    positions, curves = cosine_curves(base=base, head_dim=head_dim, length=length, pairs=pairs)
    wavelength = wavelengths(default_inv_freq(head_dim, float(base)))
    if pairs is None:
        fast, slow = _default_pairs(head_dim)
        panels = [("high-frequency pairs (short wavelength): neighbours differ, local position", fast),
                  ("low-frequency pairs (long wavelength): neighbours alike, global position", slow)]
    else:
        panels = [("selected pairs", list(curves))]
    figure = _new_figure(8, 2.4 * len(panels) + 0.6)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axis, (title, group) in zip(axes, panels):
        for j in group:
            axis.plot(positions.numpy(), curves[j].numpy(), linewidth=1.0,
                      label=f"pair {j} (wavelength {_tokens_text(wavelength[j].item())})")
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(r"$\cos(m\,\theta_j)$")
        axis.set_ylim(-1.1, 1.1)
        axis.legend(fontsize=8, loc="lower left", framealpha=0.9)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("token index m")
    figure.suptitle(f"RoPE angle per pair: base {base:g}, head_dim {head_dim}", fontsize=11)
    return figure


# ---------------------------------------------------------------------------------------------
# (b) llama3: wavelength bands
# ---------------------------------------------------------------------------------------------
def llama3_data(*, base: float = LLAMA31_8B["base"], head_dim: int = LLAMA31_8B["head_dim"],
                factor: float = LLAMA31_8B["factor"], low_freq_factor: float = LLAMA31_8B["low_freq_factor"],
                high_freq_factor: float = LLAMA31_8B["high_freq_factor"],
                original_max_position_embeddings: int = LLAMA31_8B["original_max_position_embeddings"]) -> dict[str, Any]:
    """What :func:`plot_llama3` draws: ``original`` and ``scaled`` wavelengths (float64, per pair),
    the band masks and their index ranges (``{"high": [(0, 28)], ...}``), and the two thresholds
    ``orig/high_freq_factor`` (below: kept) and ``orig/low_freq_factor`` (above: divided by factor)."""
    from posemb.functional.rope_schedules import compute_inv_freq, default_inv_freq, llama3_bands, wavelengths

    _check_head_dim(head_dim)
    params = {"factor": factor, "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
              "original_max_position_embeddings": original_max_position_embeddings}
    scaled, _ = compute_inv_freq("llama3", head_dim, base, params)
    original = default_inv_freq(head_dim, base)
    bands = llama3_bands(original, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                         original_max_position_embeddings=original_max_position_embeddings)
    return {"original": wavelengths(original), "scaled": wavelengths(scaled), "bands": bands,
            "ranges": {name: _ranges(getattr(bands, name)) for name in ("high", "medium", "low")},
            "high_wavelength": original_max_position_embeddings / high_freq_factor,
            "low_wavelength": original_max_position_embeddings / low_freq_factor}


def plot_llama3(**config):
    """Original and Llama 3.1-scaled wavelength ``2*pi/inv_freq`` per pair (log scale). Pairs with
    wavelength below ``orig/high_freq_factor`` are kept (high band), above ``orig/low_freq_factor``
    stretched by ``factor`` (low band), blended in between (Meta's ``apply_scaling``, as in
    ``_compute_llama3_parameters`` of transformers' ``modeling_rope_utils.py``).
    Keyword arguments as :func:`llama3_data` (default: Llama 3.1 8B)."""
    data = llama3_data(**config)
    pairs = torch.arange(len(data["original"])).numpy()
    figure = _new_figure(8, 4.5)
    axis = figure.subplots()
    colours = {"high": "tab:green", "medium": "tab:orange", "low": "tab:blue"}
    names = {"high": "high frequency: kept", "medium": "medium: blended", "low": "low frequency: / factor"}
    for band, ranges in data["ranges"].items():
        for number, (first, last) in enumerate(ranges):
            axis.axvspan(first - 0.5, last + 0.5, color=colours[band], alpha=0.12,
                         label=f"{names[band]} (pairs {first}-{last})" if number == 0 else None)
    axis.semilogy(pairs, data["original"].numpy(), "o-", markersize=2.5, linewidth=1, color="0.3",
                  label="original wavelength")
    axis.semilogy(pairs, data["scaled"].numpy(), "s-", markersize=2.5, linewidth=1, color="tab:red",
                  label="Llama 3.1 scaled wavelength")
    axis.axhline(data["high_wavelength"], color="tab:green", linestyle="--", linewidth=1,
                 label=f"orig / high_freq_factor = {data['high_wavelength']:,.0f}")
    axis.axhline(data["low_wavelength"], color="tab:blue", linestyle="--", linewidth=1,
                 label=f"orig / low_freq_factor = {data['low_wavelength']:,.0f}")
    axis.set_xlabel("pair index j")
    axis.set_ylabel("wavelength (tokens)")
    config_text = {**LLAMA31_8B, **config}
    axis.set_title(f"Llama 3.1 RoPE scaling: base {config_text['base']:g}, head_dim {config_text['head_dim']}, "
                   f"factor {config_text['factor']:g}, orig {config_text['original_max_position_embeddings']}",
                   fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    axis.grid(alpha=0.3, which="both")
    return figure


# ---------------------------------------------------------------------------------------------
# (c) schedules: every rope_type side by side
# ---------------------------------------------------------------------------------------------
def schedule_data(*, head_dim: int = 128, base: float = 10000.0, factor: float = 8.0,
                  original_max_position_embeddings: int = 4096, seq_len: int | None = None) -> dict[str, dict[str, Any]]:
    """``{label: {"rope_type", "inv_freq", "wavelength", "stretch", "attention_scale"}}`` for every
    :data:`posemb.functional.rope_schedules.ROPE_TYPES`, where ``stretch = inv_freq_default / inv_freq``.

    All types share ``factor`` and ``original_max_position_embeddings`` (used as
    ``max_position_embeddings`` for dynamic NTK, whose frequencies are shown at ``seq_len``,
    default ``factor * orig``, and as the extended length ``factor * orig`` for yarn/longrope).
    LongRoPE's per-pair factors come from a search on a trained model; the picture uses an
    *illustrative* ramp ``1 -> factor`` over the pairs (short factors all 1), labelled as such.
    """
    from posemb.functional.rope_schedules import ROPE_TYPES, compute_inv_freq, dynamic_ntk_base, wavelengths

    _check_head_dim(head_dim)
    check_int("original_max_position_embeddings", original_max_position_embeddings, minimum=1)
    factor = check_float("factor", factor, minimum=1.0)
    extended = int(round(factor * original_max_position_embeddings))
    if seq_len is None:
        seq_len = extended
    check_int("seq_len", seq_len, minimum=1)
    half = head_dim // 2
    ramp = [1.0 + (factor - 1.0) * j / max(half - 1, 1) for j in range(half)]
    configs = {
        "default": ({}, {}),
        "linear": ({"factor": factor}, {}),
        "ntk": ({"factor": factor}, {}),
        "dynamic": ({"factor": factor}, {"seq_len": seq_len, "max_position_embeddings": original_max_position_embeddings}),
        "yarn": ({"factor": factor, "original_max_position_embeddings": original_max_position_embeddings}, {}),
        "longrope": ({"short_factor": [1.0] * half, "long_factor": ramp, "factor": factor,
                      "original_max_position_embeddings": original_max_position_embeddings},
                     {"seq_len": extended}),
        "llama3": ({"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": original_max_position_embeddings}, {}),
    }
    baseline, _ = compute_inv_freq("default", head_dim, base)
    out = {}
    for rope_type in ROPE_TYPES:
        if rope_type not in configs:  # a type added later: shown only once it has a config here
            continue
        params, extra = configs[rope_type]
        inv_freq, scale = compute_inv_freq(rope_type, head_dim, base, params, **extra)
        label = rope_type
        if rope_type == "dynamic":
            new_base = dynamic_ntk_base(base, factor, head_dim, seq_len, original_max_position_embeddings)
            label = f"dynamic (seq_len {seq_len}: base {new_base:.3g})"
        elif rope_type == "longrope":
            label = "longrope (illustrative long factors 1 -> factor)"
        elif rope_type == "llama3":
            label = "llama3 (low 1, high 4)"
        if scale != 1.0:
            label += f", cos/sin x {scale:.3f}"
        out[label] = {"rope_type": rope_type, "inv_freq": inv_freq, "wavelength": wavelengths(inv_freq),
                      "stretch": baseline / inv_freq, "attention_scale": scale}
    return out


def plot_schedules(*, head_dim: int = 128, base: float = 10000.0, factor: float = 8.0,
                   original_max_position_embeddings: int = 4096, seq_len: int | None = None):
    """Left: wavelength per pair for every rope_type (log scale). Right: the stretch
    ``inv_freq_default / inv_freq`` each applies per pair (1 = unchanged, ``factor`` = position
    interpolation). Arguments as :func:`schedule_data`."""
    data = schedule_data(head_dim=head_dim, base=base, factor=factor,
                         original_max_position_embeddings=original_max_position_embeddings, seq_len=seq_len)
    figure = _new_figure(11, 5.2)
    left, right = figure.subplots(1, 2)
    styles = ["-", "--", "-.", ":"]
    for number, (label, row) in enumerate(data.items()):
        pairs = torch.arange(len(row["inv_freq"])).numpy()
        style = styles[number % len(styles)]
        left.semilogy(pairs, row["wavelength"].numpy(), style, linewidth=1.4, label=label)
        right.semilogy(pairs, row["stretch"].numpy(), style, linewidth=1.4, label=label)
    left.axhline(original_max_position_embeddings, color="0.5", linewidth=0.8)
    left.text(0, original_max_position_embeddings * 1.15, f"orig {original_max_position_embeddings}",
              fontsize=8, color="0.4")
    left.set_title("wavelength 2π / inv_freq", fontsize=10)
    left.set_ylabel("tokens")
    right.set_title("stretch = inv_freq_default / inv_freq", fontsize=10)
    for axis in (left, right):
        axis.set_xlabel("pair index j")
        axis.grid(alpha=0.3, which="both")
    handles, labels = right.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"RoPE frequency schedules: head_dim {head_dim}, base {base:g}, factor {factor:g}, "
                    f"orig {original_max_position_embeddings}", fontsize=11)
    return figure


# ---------------------------------------------------------------------------------------------
# (d) decay: Su et al. §3.4.3, Fig. 2
# ---------------------------------------------------------------------------------------------
def rope_decay_bound(distances: Tensor | Sequence[int] | int, *, head_dim: int = 128,
                     base: float = 10000.0) -> Tensor:
    """RoPE's relative upper bound ``(1/(d/2)) * sum_{j=1}^{d/2} |S_j|`` with
    ``S_j = sum_{k=0}^{j-1} exp(i * r * theta_k)``, ``theta_k = base^(-2k/d)``, for each relative
    distance ``r`` (Su et al. 2021, arXiv 2104.09864, §3.4.3: by Abel summation
    ``|sum_i h_i e^{i r theta_i}| <= max_i |h_{i+1} - h_i| * sum_j |S_j|``). Float64, shape of
    ``distances`` (an int gives ``0 .. distances``). At ``r = 0`` it is ``(d/2 + 1) / 2``."""
    from posemb.functional.rope_schedules import default_inv_freq

    _check_head_dim(head_dim)
    if isinstance(distances, int) and not isinstance(distances, bool):
        check_int("distances", distances, minimum=0, maximum=MAX_POINTS)
        distances = torch.arange(distances + 1)
    distances = torch.as_tensor(distances, dtype=torch.float64)
    theta = default_inv_freq(head_dim, check_float("base", base))
    angles = distances[..., None] * theta  # (..., d/2)
    # S_j for j = 1 .. d/2 is the running sum of the unit phasors, real and imaginary parts apart.
    partial_real, partial_imag = torch.cos(angles).cumsum(-1), torch.sin(angles).cumsum(-1)
    return torch.hypot(partial_real, partial_imag).mean(-1)


def plot_decay(*, head_dim: int = 128, bases: Sequence[float] = (10000.0,), max_distance: int = 250):
    """Su et al. Fig. 2: the relative upper bound :func:`rope_decay_bound` against the relative
    distance ``0 .. max_distance``, one curve per base."""
    check_int("max_distance", max_distance, minimum=1, maximum=MAX_POINTS)
    bases = [check_float("bases[]", b) for b in bases]
    if not bases:
        raise ValueError("bases must hold at least one base, got an empty list")
    if len(bases) > MAX_CURVES:
        raise ValueError(f"bases must hold at most {MAX_CURVES} bases, got {len(bases)}")
    distances = torch.arange(max_distance + 1)
    figure = _new_figure(7, 4.2)
    axis = figure.subplots()
    for base in bases:
        axis.plot(distances.numpy(), rope_decay_bound(distances, head_dim=head_dim, base=base).numpy(),
                  linewidth=1.2, label=f"base {base:g}")
    axis.set_xlabel("relative distance m - n")
    axis.set_ylabel(r"relative upper bound $\frac{1}{d/2}\sum_j |S_j|$")
    axis.set_title(f"RoPE long-term decay (Su et al. 2021, §3.4.3), head_dim {head_dim}", fontsize=10)
    axis.grid(alpha=0.3)
    if len(bases) > 1:
        axis.legend(fontsize=8)
    return figure


# ---------------------------------------------------------------------------------------------
# saving and the command line
# ---------------------------------------------------------------------------------------------
def _check_output(path: str | Path, dpi: int) -> Path:
    path = Path(path)
    check_choice("out suffix", path.suffix.lower(), SAVE_FORMATS)
    check_int("dpi", dpi, minimum=10, maximum=1200)
    return path


def save_figure(figure, path: str | Path, *, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``figure`` to ``path`` (.png, .pdf or .svg; parent folders are created)."""
    path = _check_output(path, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


_PLOT_FUNCTIONS: dict[str, Callable[..., Any]] = {"cosine": plot_cosine, "llama3": plot_llama3,
                                                  "schedules": plot_schedules, "decay": plot_decay}


def plot_all(out_dir: str | Path, *, dpi: int = DEFAULT_DPI, force: bool = False) -> list[Path]:
    """Write every picture with its defaults to ``out_dir/NAME.png``; return the paths. A file
    there that posemb did not write (or wrote at another ``dpi``) is replaced only with ``force``;
    that is checked, with the folder's writability, before anything is drawn."""
    check_int("dpi", dpi, minimum=10, maximum=1200)
    names = [f"{name}.png" for name in PLOT_NAMES]
    identity = hashlib.sha256(f"posemb plot all, dpi {dpi}".encode()).hexdigest()[:10]
    with OutputDir(out_dir, identity=identity, argument="--out-dir", lock=False) as out:
        out.claim(names, force=force)
        paths = []
        for name, file_name in zip(PLOT_NAMES, names):
            buffer = io.BytesIO()
            _PLOT_FUNCTIONS[name]().savefig(buffer, format="png", dpi=dpi)
            paths.append(out.write_bytes(file_name, buffer.getvalue()))
    return paths


def _handle(args: argparse.Namespace) -> int:
    if args.plot == "all":
        for path in plot_all(args.out_dir, dpi=args.dpi, force=args.force):
            print(path)
        return 0
    check_writable_file(_check_output(args.out, args.dpi), "--out")  # before drawing
    if args.plot == "cosine":
        figure = plot_cosine(base=args.base, head_dim=args.head_dim, length=args.length, pairs=args.pairs)
    elif args.plot == "llama3":
        figure = plot_llama3(base=args.base, head_dim=args.head_dim, factor=args.factor,
                             low_freq_factor=args.low_freq_factor, high_freq_factor=args.high_freq_factor,
                             original_max_position_embeddings=args.original_max_position_embeddings)
    elif args.plot == "schedules":
        figure = plot_schedules(head_dim=args.head_dim, base=args.base, factor=args.factor,
                                original_max_position_embeddings=args.original_max_position_embeddings,
                                seq_len=args.seq_len)
    else:
        figure = plot_decay(head_dim=args.head_dim, bases=args.bases, max_distance=args.max_distance)
    print(save_figure(figure, args.out, dpi=args.dpi))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="draw RoPE's pictures (cosine, llama3, schedules, decay, all)",
                                   description="Draw one of RoPE's pictures to an image file.")
    names = parser.add_subparsers(dest="plot", metavar="NAME", required=True)

    def common(sub: argparse.ArgumentParser, out_required: bool = True) -> None:
        if out_required:
            sub.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg)")
        sub.add_argument("--dpi", type=int, default=DEFAULT_DPI, help=f"resolution (default {DEFAULT_DPI})")
        sub.set_defaults(handler=_handle)

    cosine = names.add_parser("cosine", help="cos(position * theta_j) for fast and slow pairs")
    cosine.add_argument("--base", type=float, default=10000.0, help="RoPE base (default 10000)")
    cosine.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    cosine.add_argument("--length", type=int, default=256, help="number of token positions (default 256)")
    cosine.add_argument("--pairs", type=int, nargs="+", default=None, help="pair indices (default: 3 fast + 3 slow)")
    common(cosine)

    llama3 = names.add_parser("llama3", help="Llama 3.1 wavelength bands (default: Llama 3.1 8B)")
    llama3.add_argument("--base", type=float, default=LLAMA31_8B["base"])
    llama3.add_argument("--head-dim", type=int, default=LLAMA31_8B["head_dim"])
    llama3.add_argument("--factor", type=float, default=LLAMA31_8B["factor"])
    llama3.add_argument("--low-freq-factor", type=float, default=LLAMA31_8B["low_freq_factor"])
    llama3.add_argument("--high-freq-factor", type=float, default=LLAMA31_8B["high_freq_factor"])
    llama3.add_argument("--original-max-position-embeddings", type=int,
                        default=LLAMA31_8B["original_max_position_embeddings"])
    common(llama3)

    schedules = names.add_parser("schedules", help="every rope_type's wavelengths and stretch at one config")
    schedules.add_argument("--base", type=float, default=10000.0)
    schedules.add_argument("--head-dim", type=int, default=128)
    schedules.add_argument("--factor", type=float, default=8.0)
    schedules.add_argument("--original-max-position-embeddings", type=int, default=4096)
    schedules.add_argument("--seq-len", type=int, default=None,
                           help="length at which dynamic NTK is shown (default factor * orig)")
    common(schedules)

    decay = names.add_parser("decay", help="RoPE long-term decay of the relative upper bound (Su et al. Fig. 2)")
    decay.add_argument("--head-dim", type=int, default=128)
    decay.add_argument("--bases", type=float, nargs="+", default=[10000.0], help="one curve per base")
    decay.add_argument("--max-distance", type=int, default=250)
    common(decay)

    every = names.add_parser("all", help="write all four pictures as OUT_DIR/NAME.png")
    every.add_argument("--out-dir", required=True, help="folder to write into")
    every.add_argument("--force", action="store_true",
                       help="replace NAME.png files that posemb did not write there (or wrote at another --dpi)")
    common(every, out_required=False)

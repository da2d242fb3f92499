"""The study's figures, drawn from the summary rows (:mod:`posemb.lab.summary`).

Each function returns a matplotlib ``Figure`` built on the object API with an Agg canvas attached
explicitly (:func:`new_figure`): nothing here selects a backend or touches ``pyplot``'s global
state, so a user's interactive session is left as it was. :func:`png_bytes` renders one.
"""
from __future__ import annotations

import io
import math

from posemb.lab.evaluate import BEYOND_N_MAX
from posemb.lab.summary import family_sorted_labels, is_variant, mean

STUDY_DPI = 110


def new_figure(width: float, height: float, *, layout: str | None = None):
    """A ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas (no pyplot, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure, *, dpi: int = STUDY_DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _colors(rows: list[dict], labels: list[str]) -> dict[str, tuple]:
    """One fixed colour per label (20 distinct ones), the same in every panel of every plot:
    trained schemes first, so adding a variant never recolours a scheme."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    ordered = [l for l in labels if not is_variant(rows, l)] + [l for l in labels if is_variant(rows, l)]
    return {label: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, label in enumerate(ordered)}


def _style(rows: list[dict], label: str) -> str:
    return "--" if is_variant(rows, label) else "-"


def ppl_vs_length(rows: list[dict], train_length: int):
    """Perplexity against evaluation length (log-log), one line per label, seed spread as bars."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    figure = new_figure(9.0, 5.0)
    axis = figure.subplots()
    labels = family_sorted_labels(rows)
    colors = _colors(rows, labels)
    for label in labels:
        points = [(r["eval_length"], r["ppl"], r) for r in rows if r["scheme"] == label and r["ppl"] is not None]
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        low = [y - math.exp(r["loss"] - (r["loss_spread"] or 0) / 2) for _, y, r in points]
        high = [math.exp(r["loss"] + (r["loss_spread"] or 0) / 2) - y for _, y, r in points]
        beyond = any(r["scheme"] == label and r["note"] == BEYOND_N_MAX for r in rows)
        axis.errorbar(xs, ys, yerr=[low, high], fmt=_style(rows, label), marker="o", markersize=3, capsize=2,
                      color=colors[label], label=label + (" (n/a beyond N_max)" if beyond else ""))
    axis.axvline(train_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("evaluation length (bytes)")
    axis.set_ylabel("perplexity (per byte)")
    axis.set_title(f"Perplexity by length (trained at {train_length}, dotted line)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    return figure


def loss_by_position(rows: list[dict], train_length: int):
    """Top: loss per position bucket at each label's longest evaluated length. Bottom: the paired
    rise, each byte's loss minus its own loss at the training length, per position bucket (zero
    up to the training length by construction; the text's difficulty cancels). Trained schemes in
    the first column; each scheme with inference-time variants gets a column of its own."""
    labels = family_sorted_labels(rows)
    panels = [("trained schemes", [l for l in labels if not is_variant(rows, l)])]
    bases = []
    for row in rows:
        if row.get("variant") is not None and row["base_scheme"] not in bases:
            bases.append(row["base_scheme"])
    for base in bases:
        members = [l for l in labels if any(r["scheme"] == l and r["base_scheme"] == base for r in rows)]
        panels.append((f"{base}: inference-time scaling, no fine-tuning", members))
    longest = max(r["eval_length"] for r in rows)
    colors = _colors(rows, labels)
    figure = new_figure(7.0 * len(panels), 8.4)
    axes = figure.subplots(2, len(panels), squeeze=False, sharex=True)
    for column, (title, panel_labels) in enumerate(panels):
        for label in panel_labels:
            found = [r for r in rows if r["scheme"] == label and r["buckets"]]
            if not found:
                continue
            row = max(found, key=lambda r: r["eval_length"])
            suffix = "" if row["eval_length"] == longest else f" (@{row['eval_length']}, N_max)"
            for line, key in ((0, "buckets"), (1, "rise_buckets")):
                buckets = [b for b in (row[key] or []) if b["loss"] is not None]
                if not buckets:
                    continue
                # Geometric centre of the bucket in 1-based positions, so a log axis can show position 0.
                xs = [math.sqrt((b["start"] + 1) * b["stop"]) for b in buckets]
                axes[line][column].plot(xs, [b["loss"] for b in buckets], marker=".", markersize=3,
                                        linestyle=_style(rows, label), color=colors[label], label=label + suffix)
        axes[0][column].set_title(title)
        axes[0][column].set_ylabel("mean loss (nats/byte)")
        axes[1][column].set_ylabel("loss minus the same byte's loss at L_train")
        axes[1][column].axhline(0.0, color="black", linewidth=0.6)
        axes[1][column].set_xlabel("position in the window, 1-based (geometric bucket centre)")
        for axis in (axes[0][column], axes[1][column]):
            axis.axvline(train_length + 0.5, color="grey", linestyle=":", linewidth=1)
            axis.set_xscale("log", base=2)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
            axis.grid(True, alpha=0.3)
    figure.suptitle(f"Loss by position at length {longest} (dotted: training length {train_length})")
    return figure


def passkey_accuracy(rows: list[dict], train_length: int):
    """Passkey accuracy (mean over depths) against evaluation length, one line per label."""
    figure = new_figure(7.5, 4.6)
    axis = figure.subplots()
    labels = family_sorted_labels(rows)
    colors = _colors(rows, labels)
    for label in labels:
        lengths = sorted({r["eval_length"] for r in rows if r["scheme"] == label})
        xs, ys = [], []
        for length in lengths:
            found = [r["accuracy"] for r in rows if r["scheme"] == label and r["eval_length"] == length]
            if found and all(a is not None for a in found):
                xs.append(length)
                ys.append(mean(found))
        if xs:
            axis.plot(xs, ys, marker="o", linestyle=_style(rows, label), color=colors[label], label=label)
    axis.axvline(train_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_ylim(-0.05, 1.05)
    axis.set_xlabel("evaluation length (bytes)")
    axis.set_ylabel("passkey accuracy (mean over depths)")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, ncol=2)
    axis.grid(True, alpha=0.3)
    return figure

"""The study's report: ``report.md`` (the seed's comparison table rebuilt from measurements, with
verdicts computed from the numbers), ``results.csv``, ``results.json`` and the plots.

Extrapolation is measured as the **rise** of a scheme's loss at a length above its own loss at the
training length (``shared/reference/study_notes.md``): small models learn at different speeds, so
raw loss at long lengths mixes learning speed with extrapolation. With several seeds every number is
the mean over seeds and ``[x]`` is the seed-to-seed spread (max - min).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from posemb.lab.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from posemb.lab.evaluate import BEYOND_N_MAX

# Verdict thresholds (nats/token of rise above the loss at L_train). A rise within the larger of
# HOLD_NATS and the seed spread is "holds"; the study notes measured seed noise in the rise of
# <= 0.01 for the steadiest schemes and up to 0.15 for the noisiest.
HOLD_NATS = 0.05
GENTLE_NATS = 0.30
DEGRADE_NATS = 1.00
CLASSES = ("holds", "degrades gently", "degrades", "breaks down")

FAMILY_ORDER = ("absolute", "relative", "rotary", "none")
FAMILY_TITLES = {"absolute": "Absolute", "relative": "Relative", "rotary": "Rotary (RoPE)", "none": "No position (NoPE)"}
# The seed's comparison table, section 0 of shared/seed/SEED_SUMMARY.md (its claims, in short).
SEED_TABLE = {
    "absolute": ("each position i gets a vector p_i, fixed (sin/cos) or learned, up to a maximum length",
                 "hard to generalise to other lengths"),
    "relative": ("an embedding per distance (j - i), added inside attention (keys, values, or a scalar bias)",
                 "robust to length change, truncation, reordering"),
    "rotary": ("rotate q and k by a position-dependent angle, so q.k depends on the distance",
               "generalises somewhat beyond the max length; far beyond it, quality drops"),
    "none": ("no positional signal: the causal mask alone (baseline, not in the seed's table)", "-"),
}


# ---- aggregation --------------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float]) -> float | None:
    return max(values) - min(values) if len(values) > 1 else None


def labels_in_order(records: list[dict]) -> list[str]:
    """Every evaluated label (schemes, then RoPE variants after rope), in first-seen order."""
    seen: list[str] = []
    for record in records:
        for label in record["eval"]:
            if label not in seen:
                seen.append(label)
    return seen


def summarize_lm(records: list[dict], train_length: int, eval_lengths: list[int]) -> list[dict]:
    """One row per (label, eval_length): means over seeds of loss, ppl and rise, with spreads."""
    rows = []
    for label in labels_in_order(records):
        runs = [r for r in records if label in r["eval"]]
        base_scheme = label.split("+")[0]
        train_stats = [r["train"] for r in runs]
        variant = "+" in label
        for length in eval_lengths:
            entries = [r["eval"][label].get(str(length)) for r in runs]
            entries = [e for e in entries if e is not None]
            row: dict[str, Any] = {
                "scheme": label, "family": runs[0]["family"], "base_scheme": base_scheme,
                "train_length": train_length, "eval_length": length, "factor": length / train_length,
                "seeds": len(entries), "loss": None, "ppl": None, "rise": None, "loss_spread": None,
                "rise_spread": None, "tokens": None,
                "position_params": train_stats[0].get("position_params"),
                "train_tokens_per_s": None if variant else _mean([s["tokens_per_s"] for s in train_stats]),
                "note": "", "buckets": None, "rise_buckets": None,
            }
            if not entries:
                row["note"] = "not evaluated"
                rows.append(row)
                continue
            notes = {e.get("note", "") for e in entries if e.get("note")}
            losses = [e["loss"] for e in entries if e.get("loss") is not None]
            if len(losses) != len(entries):
                row["note"] = "; ".join(sorted(notes)) or "missing"
                rows.append(row)
                continue
            bases = [r["eval"][label].get(str(train_length)) for r in runs]
            rises = [e["loss"] - b["loss"] for e, b in zip(entries, bases) if b and b.get("loss") is not None]
            row.update(loss=_mean(losses), loss_spread=_spread(losses), tokens=entries[0].get("tokens"))
            row["ppl"] = math.exp(min(row["loss"], 700.0))
            if len(rises) == len(entries):
                row.update(rise=_mean(rises), rise_spread=_spread(rises))
            row["note"] = entries[0].get("note", "")
            row["buckets"] = _mean_buckets([e.get("buckets") or [] for e in entries])
            row["rise_buckets"] = _mean_buckets([e.get("rise_buckets") or [] for e in entries])
            rows.append(row)
    return rows


def _mean_buckets(curves: list[list[dict]]) -> list[dict]:
    if not curves or not curves[0]:
        return []
    out = []
    for i, bucket in enumerate(curves[0]):
        values = [c[i]["loss"] for c in curves if i < len(c) and c[i]["loss"] is not None]
        out.append({"start": bucket["start"], "stop": bucket["stop"], "loss": _mean(values) if values else None})
    return out


def summarize_passkey(records: list[dict], train_length: int, eval_lengths: list[int]) -> list[dict]:
    """One row per (label, eval_length, depth): mean accuracy and key-digit loss over seeds."""
    rows = []
    for label in labels_in_order(records):
        runs = [r for r in records if label in r["eval"]]
        for length in eval_lengths:
            per_seed = [r["eval"][label].get(str(length)) or [] for r in runs]
            depths = [d["depth"] for d in per_seed[0]] if per_seed and per_seed[0] else []
            for i, depth in enumerate(depths):
                entries = [p[i] for p in per_seed if i < len(p)]
                row: dict[str, Any] = {"scheme": label, "family": runs[0]["family"], "train_length": train_length,
                                       "eval_length": length, "depth": depth, "seeds": len(entries),
                                       "accuracy": None, "accuracy_spread": None, "loss": None, "ppl": None,
                                       "note": ""}
                if any(e.get("accuracy") is None for e in entries):
                    row["note"] = BEYOND_N_MAX if any(e.get("note") == BEYOND_N_MAX for e in entries) else "missing"
                else:
                    accuracy = [e["accuracy"] for e in entries]
                    row.update(accuracy=_mean(accuracy), accuracy_spread=_spread(accuracy),
                               loss=_mean([e["loss"] for e in entries]))
                    row["ppl"] = math.exp(min(row["loss"], 700.0))
                rows.append(row)
    return rows


# ---- verdicts -----------------------------------------------------------------------------------

def classify(rise: float, spread: float | None = None) -> str:
    """``holds`` / ``degrades gently`` / ``degrades`` / ``breaks down`` for a rise in nats/token."""
    tolerance = max(HOLD_NATS, spread or 0.0)
    if rise <= tolerance:
        return "holds"
    if rise <= GENTLE_NATS:
        return "degrades gently"
    if rise <= DEGRADE_NATS:
        return "degrades"
    return "breaks down"


def scheme_trajectory(rows: list[dict], label: str, train_length: int) -> list[tuple[int, str, float | None]]:
    """(factor, class or 'n/a', rise) at each length above the training length."""
    out = []
    for row in rows:
        if row["scheme"] != label or row["eval_length"] <= train_length:
            continue
        factor = row["eval_length"] // train_length
        if row["rise"] is None:
            out.append((factor, "n/a", None))
        else:
            out.append((factor, classify(row["rise"], row["rise_spread"]), row["rise"]))
    return out


def scheme_phrase(rows: list[dict], label: str, train_length: int) -> str:
    """E.g. ``alibi holds to 16x (rise +0.01)`` or
    ``rope holds to 2x (+0.03), degrades gently at 4x (+0.21), breaks down by 16x (+2.31)``."""
    trajectory = scheme_trajectory(rows, label, train_length)
    if not trajectory:
        return f"{label}: evaluated at the training length only"
    numeric = [t for t in trajectory if t[2] is not None]
    if not numeric:
        return f"{label} cannot run beyond N_max = {train_length} (no table rows; never clamped)"
    if all(t[1] == "holds" for t in numeric):
        return f"{label} holds to {numeric[-1][0]}x (rise {numeric[-1][2]:+.2f})"
    parts = []
    leading = []
    for t in numeric:
        if t[1] != "holds":
            break
        leading.append(t)
    if leading:
        parts.append(f"holds to {leading[-1][0]}x ({leading[-1][2]:+.2f})")
    previous = "holds"
    for index, (factor, cls, rise) in enumerate(numeric[len(leading):], start=len(leading)):
        if cls != previous:
            parts.append(f"{cls} at {factor}x ({rise:+.2f})")
            previous = cls
        elif index == len(numeric) - 1:
            parts[-1] += f" to {factor}x ({rise:+.2f})"
    return f"{label} " + ", ".join(parts)


def _final_class(rows: list[dict], label: str, train_length: int) -> str | None:
    trajectory = scheme_trajectory(rows, label, train_length)
    return trajectory[-1][1] if trajectory else None


def family_verdicts(rows: list[dict], train_length: int) -> dict[str, str]:
    """A one-line verdict per family, computed from the rows (never written by hand)."""
    verdicts = {}
    for family in FAMILY_ORDER:
        labels = []
        for row in rows:
            if row["family"] == family and row["scheme"] not in labels:
                labels.append(row["scheme"])
        if not labels:
            continue
        in_range = [(r["loss"], r["scheme"]) for r in rows
                    if r["family"] == family and r["eval_length"] == train_length and r["loss"] is not None
                    and "+" not in r["scheme"]]
        pieces = []
        if in_range:
            low, best = min(in_range)
            high = max(in_range)[0]
            span = f"{low:.3f}" if len(in_range) == 1 else f"{low:.3f}-{high:.3f}"
            pieces.append(f"In range: loss {span} at L_train = {train_length}" +
                          (f" (best {best})" if len(in_range) > 1 else ""))
        pieces.append("Beyond it: " + "; ".join(scheme_phrase(rows, label, train_length) for label in labels))
        finals = {label: _final_class(rows, label, train_length) for label in labels}
        claim = SEED_TABLE[family][1]
        if family == "absolute":
            agree = [l for l, c in finals.items() if c in ("degrades", "breaks down", "n/a")]
        elif family == "relative":
            agree = [l for l, c in finals.items() if c in ("holds", "degrades gently")]
        elif family == "rotary":
            agree = []
            for label in labels:
                trajectory = scheme_trajectory(rows, label, train_length)
                numeric = [t for t in trajectory if t[2] is not None]
                if len(numeric) >= 2 and numeric[0][1] in ("holds", "degrades gently") and \
                        numeric[-1][2] > numeric[0][2] + HOLD_NATS:
                    agree.append(label)
        else:
            agree = None
        if agree is not None:
            considered = [l for l, c in finals.items() if c is not None]
            pieces.append(f"Seed's claim \"{claim}\": borne out by {len(agree)} of {len(considered)}"
                          + (f" ({', '.join(agree)})" if agree else ""))
        verdicts[family] = ". ".join(pieces) + "."
    return verdicts


def separation_check(rows: list[dict], train_length: int) -> str:
    """Compare the differences between schemes' rises with their seed-to-seed spreads.

    Two labels count as *separated* at a length when their seed ranges of the rise do not overlap,
    i.e. ``|mean_a - mean_b| > (spread_a + spread_b) / 2``; only labels run with several seeds take part.
    """
    longer = sorted({r["eval_length"] for r in rows if r["eval_length"] > train_length})
    if not longer:
        return "Evaluated at the training length only: nothing to compare."
    lines = []
    longest = longer[-1]
    finals = sorted((r["rise"], r["scheme"]) for r in rows if r["eval_length"] == longest and r["rise"] is not None)
    if len(finals) >= 2:
        lines.append(f"At {longest} ({longest // train_length}x) the rises span {finals[0][0]:+.3f} ({finals[0][1]}) "
                     f"to {finals[-1][0]:+.3f} ({finals[-1][1]}).")
    seeded = [r for r in rows if r["rise_spread"] is not None and r["eval_length"] > train_length]
    if not seeded:
        lines.append("Only one seed was run, so no spread is measured here: rerun with `--seeds 0,1` "
                     "(docs/study.md gives the spread measured for the default configuration).")
        return " ".join(lines)
    lines.append("")
    lines.append("| length | labels with several seeds | largest spread of the rise | median spread | "
                 "pairs separated (seed ranges do not overlap) |")
    lines.append("|---|---|---|---|---|")
    for length in longer:
        here = [r for r in seeded if r["eval_length"] == length]
        if len(here) < 2:
            continue
        spreads = sorted(r["rise_spread"] for r in here)
        pairs = [(a, b) for i, a in enumerate(here) for b in here[i + 1:]]
        apart = sum(1 for a, b in pairs if abs(a["rise"] - b["rise"]) > (a["rise_spread"] + b["rise_spread"]) / 2)
        lines.append(f"| {length} ({length // train_length}x) | {len(here)} | {spreads[-1]:.3f} "
                     f"({max(here, key=lambda r: r['rise_spread'])['scheme']}) | {spreads[len(spreads) // 2]:.3f} | "
                     f"{apart} of {len(pairs)} |")
    return "\n".join(lines)


# ---- formatting ---------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _with_spread(value: float | None, spread: float | None, sign: bool = False) -> str:
    text = _fmt(value, 3, sign)
    if value is not None and spread is not None:
        text += f" [{spread:.3f}]"
    return text


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _family_sorted_labels(rows: list[dict]) -> list[str]:
    labels: list[str] = []
    for family in FAMILY_ORDER:
        for row in rows:
            if row["family"] == family and row["scheme"] not in labels:
                labels.append(row["scheme"])
    for row in rows:
        if row["scheme"] not in labels:
            labels.append(row["scheme"])
    return labels


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["loss"] is None:
        return row["note"] or "-"
    return f"{_with_spread(row['loss'], row['loss_spread'])} ({row['ppl']:.2f})"


def _measured_cell(rows: list[dict], label: str, train_length: int, longer: list[int]) -> str:
    final = _final_class(rows, label, train_length)
    if final is None or not longer:
        return f"{label}: -"
    if final == "n/a":
        return f"{label}: {BEYOND_N_MAX}"
    return f"{label}: {final} at {longer[-1] // train_length}x"


def lm_markdown(rows: list[dict], meta: dict) -> str:
    train_length = meta["config"]["train"]["train_length"]
    lengths = sorted({r["eval_length"] for r in rows})
    by_key = {(r["scheme"], r["eval_length"]): r for r in rows}
    labels = _family_sorted_labels(rows)
    seeds = meta["config"]["seeds"]
    out = io.StringIO()
    w = out.write
    w("# posemb study: positional schemes, measured\n\n")
    w(f"{len([l for l in labels if '+' not in l])} schemes, each a decoder-only LM "
      f"(dim {meta['config']['model']['dim']}, depth {meta['config']['model']['depth']}, "
      f"{meta['config']['model']['heads']} heads) trained for {meta['config']['train']['steps']} steps of "
      f"{meta['config']['train']['batch_size']} x {train_length} bytes on {meta['data']}, "
      f"then scored on the same {meta['eval_tokens']:,} validation bytes cut into windows of "
      f"{', '.join(str(l) for l in lengths)} bytes. Seeds: {', '.join(str(s) for s in seeds)}. "
      f"Wall time of this invocation: {meta['wall_time']}.\n\n")
    legend = "Numbers are means over seeds; `[x]` is the seed-to-seed spread (max - min)." if len(seeds) > 1 \
        else "One seed: see the noise section below for how far to trust small differences."
    w("## The seed's comparison table, rebuilt with measurements\n\n")
    w("Loss is mean nats per byte on validation text (perplexity in brackets); `rope+X` is the rope-trained "
      "model evaluated with inference-time scaling X, without fine-tuning. Added params are the parameters "
      "the scheme adds to the model. Train tok/s is the wall-clock training throughput of the run as it "
      "happened, so it moves with whatever else the machine was doing (load average below). " + legend + "\n\n")
    head = ["family", "scheme", "added params", "train tok/s"] + [f"loss @{l}" + (" (L_train)" if l == train_length else "")
                                                                   for l in lengths]
    w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for label in labels:
        first = by_key.get((label, lengths[0]))
        tokps = first["train_tokens_per_s"] if first else None
        w("| " + " | ".join([first["family"] if first else "-", f"`{label}`",
                            _params(first["position_params"] if first else None),
                            "eval only" if "+" in label else (f"{tokps:,.0f}" if tokps else "-")]
                           + [_cell(by_key.get((label, l))) for l in lengths]) + " |\n")
    longer = [l for l in lengths if l > train_length]
    if longer:
        w("\n### Extrapolation: rise of the loss above its own value at L_train\n\n")
        w(f"Rise = loss(L) - loss({train_length}), in nats per byte: negative means longer context helped. "
          f"Classes: holds (rise <= max({HOLD_NATS}, seed spread)), degrades gently (<= {GENTLE_NATS}), "
          f"degrades (<= {DEGRADE_NATS}), breaks down (above).\n\n")
        head = ["scheme"] + [f"rise @{l} ({l // train_length}x)" for l in longer] + ["verdict at the longest"]
        w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for label in labels:
            cells = []
            for l in longer:
                row = by_key.get((label, l))
                if row is None:
                    cells.append("-")
                elif row["rise"] is None:
                    cells.append(row["note"] or "-")
                else:
                    cells.append(_with_spread(row["rise"], row["rise_spread"], sign=True))
            final = _final_class(rows, label, train_length)
            w(f"| `{label}` | " + " | ".join(cells) + f" | {final or '-'} |\n")
    w("\n### Verdicts by family (computed from the numbers above)\n\n")
    verdicts = family_verdicts(rows, train_length)
    for family, text in verdicts.items():
        w(f"- **{FAMILY_TITLES[family]}**: {text}\n")
    w("\n### The seed's claims beside the measurements\n\n")
    w("| family | core idea (seed) | seed's claim about length | measured |\n|---|---|---|---|\n")
    for family in FAMILY_ORDER:
        if family not in verdicts:
            continue
        idea, claim = SEED_TABLE[family]
        labels_here = [l for l in labels if by_key.get((l, lengths[0])) and by_key[(l, lengths[0])]["family"] == family]
        measured = "; ".join(_measured_cell(rows, l, train_length, longer) for l in labels_here)
        w(f"| {FAMILY_TITLES[family]} | {idea} | {claim} | {measured} |\n")
    w("\n## Seed-to-seed noise and separation\n\n")
    w(separation_check(rows, train_length) + "\n")
    w("\n## Plots\n\n![perplexity by evaluation length](ppl_vs_length.png)\n\n"
      "![loss by position at the longest length](loss_by_position.png)\n")
    w(_config_section(meta))
    return out.getvalue()


def passkey_markdown(rows: list[dict], meta: dict) -> str:
    train_length = meta["config"]["train"]["train_length"]
    lengths = sorted({r["eval_length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    labels = _family_sorted_labels(rows)
    seeds = meta["config"]["seeds"]
    out = io.StringIO()
    w = out.write
    w("# posemb study: passkey retrieval by length and depth\n\n")
    w(f"Each model is trained for {meta['config']['train']['steps']} steps on passkey samples of {train_length} "
      f"bytes (a random 5-digit key at a random depth in filler), then asked for the key at lengths "
      f"{', '.join(str(l) for l in lengths)}, at depths {', '.join(f'{d:g}' for d in depths)} of the context, "
      f"{meta['config']['passkey_samples']} samples each. Accuracy = every digit right (greedy). "
      f"Seeds: {', '.join(str(s) for s in seeds)}. Wall time: {meta['wall_time']}.\n\n")
    w("## Accuracy by length (mean over depths)\n\n")
    head = ["family", "scheme"] + [f"@{l}" for l in lengths]
    w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for label in labels:
        family = next(r["family"] for r in rows if r["scheme"] == label)
        cells = []
        for l in lengths:
            found = [r for r in rows if r["scheme"] == label and r["eval_length"] == l]
            if found and all(r["accuracy"] is not None for r in found):
                cells.append(f"{_mean([r['accuracy'] for r in found]):.2f}")
            else:
                cells.append(found[0]["note"] if found else "-")
        w(f"| {family} | `{label}` | " + " | ".join(cells) + " |\n")
    w("\n## Accuracy by depth\n\n")
    head = ["scheme", "length"] + [f"depth {d:g}" for d in depths]
    w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for label in labels:
        for l in lengths:
            cells = []
            for d in depths:
                found = [r for r in rows if r["scheme"] == label and r["eval_length"] == l and r["depth"] == d]
                r = found[0] if found else None
                cells.append("-" if r is None else (r["note"] if r["accuracy"] is None else f"{r['accuracy']:.2f}"))
            w(f"| `{label}` | {l} | " + " | ".join(cells) + " |\n")
    w("\n![passkey accuracy by length](passkey_accuracy.png)\n")
    w(_config_section(meta))
    return out.getvalue()


def _config_section(meta: dict) -> str:
    env = meta["environment"]
    lines = ["\n## Configuration and environment\n"]
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- profile: {meta['config']['profile']}; model: {meta['config']['model']}")
    lines.append(f"- training: {meta['config']['train']}")
    lines.append(f"- evaluation lengths: {meta['config']['eval_lengths']}; evaluation tokens per length: "
                 f"{meta['eval_tokens']:,}")
    lines.append(f"- data: {meta['data']}")
    lines.append(f"- seeds: {meta['config']['seeds']}")
    lines.append(f"- torch {env['torch']} ({env['python']}, {env['platform']})")
    lines.append(f"- device: {env['device']}; torch threads: {env['threads']}; DDP processes: {env['world_size']}")
    lines.append(f"- load average (1 min) at start / end: {env['load_start']} / {env['load_end']} "
                 "(the machine's other users compete for the same cores; tokens/s moves with them)")
    lines.append(f"- wall time of this invocation: {meta['wall_time']} ({meta['wall_seconds']:.0f} s); "
                 f"runs trained now: {meta['trained_now']}, reused from earlier invocations: {meta['reused']}")
    lines.append(f"- posemb {env['posemb']}")
    return "\n".join(lines) + "\n"


# ---- files --------------------------------------------------------------------------------------

LM_COLUMNS = ["scheme", "family", "train_length", "eval_length", "factor", "loss", "ppl", "rise", "loss_spread",
              "rise_spread", "seeds", "tokens", "position_params", "train_tokens_per_s", "note"]
PASSKEY_COLUMNS = ["scheme", "family", "train_length", "eval_length", "depth", "accuracy", "accuracy_spread",
                   "loss", "ppl", "seeds", "note"]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: list[str]) -> dict[str, tuple]:
    """One fixed colour per label (20 distinct ones), the same in every panel of every plot."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    ordered = [l for l in labels if "+" not in l] + [l for l in labels if "+" in l]
    return {label: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, label in enumerate(ordered)}


def plot_ppl_vs_length(rows: list[dict], train_length: int, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9.0, 5.0))
    colors = _colors(_family_sorted_labels(rows))
    for label in _family_sorted_labels(rows):
        points = [(r["eval_length"], r["ppl"], r) for r in rows if r["scheme"] == label and r["ppl"] is not None]
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        low = [y - math.exp(r["loss"] - (r["loss_spread"] or 0) / 2) for _, y, r in points]
        high = [math.exp(r["loss"] + (r["loss_spread"] or 0) / 2) - y for _, y, r in points]
        style = "--" if "+" in label else "-"
        beyond = any(r["scheme"] == label and r["note"] == BEYOND_N_MAX for r in rows)
        axis.errorbar(xs, ys, yerr=[low, high], fmt=style, marker="o", markersize=3, capsize=2, color=colors[label],
                      label=label + (" (n/a beyond N_max)" if beyond else ""))
    axis.axvline(train_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("evaluation length (bytes)")
    axis.set_ylabel("perplexity (per byte)")
    axis.set_title(f"Perplexity by length (trained at {train_length}, dotted line)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    _save_figure(figure, path)
    plt.close(figure)


def plot_loss_by_position(rows: list[dict], train_length: int, path: Path) -> None:
    """Top: loss per position bucket at each label's longest evaluated length. Bottom: the paired
    rise, each byte's loss minus its own loss at the training length, per position bucket (zero
    up to the training length by construction; the text's difficulty cancels). Trained schemes on
    the left, rope with inference-time scalings on the right."""
    plt = _pyplot()
    labels = _family_sorted_labels(rows)
    variants = [l for l in labels if l.startswith("rope")]
    panels = [("trained schemes", [l for l in labels if "+" not in l])]
    if any("+" in l for l in variants):
        panels.append(("rope: inference-time scaling, no fine-tuning", variants))
    longest = max(r["eval_length"] for r in rows)
    colors = _colors(labels)
    figure, axes = plt.subplots(2, len(panels), figsize=(7.0 * len(panels), 8.4), squeeze=False, sharex=True)
    for column, (title, panel_labels) in enumerate(panels):
        for label in panel_labels:
            found = [r for r in rows if r["scheme"] == label and r["buckets"]]
            if not found:
                continue
            row = max(found, key=lambda r: r["eval_length"])
            suffix = "" if row["eval_length"] == longest else f" (@{row['eval_length']}, N_max)"
            style = "--" if "+" in label else "-"
            for line, key in ((0, "buckets"), (1, "rise_buckets")):
                buckets = [b for b in (row[key] or []) if b["loss"] is not None]
                if not buckets:
                    continue
                # Geometric centre of the bucket in 1-based positions, so a log axis can show position 0.
                xs = [math.sqrt((b["start"] + 1) * b["stop"]) for b in buckets]
                axes[line][column].plot(xs, [b["loss"] for b in buckets], marker=".", markersize=3, linestyle=style,
                                        color=colors[label], label=label + suffix)
        axes[0][column].set_title(title)
        axes[0][column].set_ylabel("mean loss (nats/byte)")
        axes[1][column].set_ylabel("loss minus the same byte's loss at L_train")
        axes[1][column].axhline(0.0, color="black", linewidth=0.6)
        axes[1][column].set_xlabel("position in the window, 1-based (geometric bucket centre)")
        for axis in (axes[0][column], axes[1][column]):
            axis.axvline(train_length + 0.5, color="grey", linestyle=":", linewidth=1)
            axis.set_xscale("log", base=2)
            axis.legend(fontsize=7)
            axis.grid(True, alpha=0.3)
    figure.suptitle(f"Loss by position at length {longest} (dotted: training length {train_length})")
    _save_figure(figure, path)
    plt.close(figure)


def plot_passkey(rows: list[dict], train_length: int, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.6))
    colors = _colors(_family_sorted_labels(rows))
    for label in _family_sorted_labels(rows):
        lengths = sorted({r["eval_length"] for r in rows if r["scheme"] == label})
        xs, ys = [], []
        for l in lengths:
            found = [r["accuracy"] for r in rows if r["scheme"] == label and r["eval_length"] == l]
            if found and all(a is not None for a in found):
                xs.append(l)
                ys.append(_mean(found))
        if xs:
            axis.plot(xs, ys, marker="o", linestyle="--" if "+" in label else "-", color=colors[label], label=label)
    axis.axvline(train_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_ylim(-0.05, 1.05)
    axis.set_xlabel("evaluation length (bytes)")
    axis.set_ylabel("passkey accuracy (mean over depths)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(True, alpha=0.3)
    _save_figure(figure, path)
    plt.close(figure)


def write_report(out: Path, task: str, records: list[dict], meta: dict, *, plots: bool = True) -> list[dict]:
    """Write report.md, results.csv, results.json (and the plots); returns the summary rows."""
    train_length = meta["config"]["train"]["train_length"]
    lengths = meta["config"]["eval_lengths"]
    if task == "passkey":
        rows = summarize_passkey(records, train_length, lengths)
        markdown, columns = passkey_markdown(rows, meta), PASSKEY_COLUMNS
    else:
        rows = summarize_lm(records, train_length, lengths)
        markdown, columns = lm_markdown(rows, meta), LM_COLUMNS
    if plots:
        if task == "passkey":
            plot_passkey(rows, train_length, out / "passkey_accuracy.png")
        else:
            plot_ppl_vs_length(rows, train_length, out / "ppl_vs_length.png")
            plot_loss_by_position(rows, train_length, out / "loss_by_position.png")
    atomic_write_text(out / "results.csv", to_csv(rows, columns))
    verdicts = family_verdicts(rows, train_length) if task == "lm" else {}
    atomic_write_json(out / "results.json", {**meta, "rows": rows, "verdicts": verdicts, "runs": records})
    atomic_write_text(out / "report.md", markdown)
    return rows

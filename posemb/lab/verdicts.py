"""Verdicts computed from the study's numbers (never written by hand): a class per rise, a phrase
per label's trajectory over the lengths, a line per family checking the study notes' claim about
length, and how far the differences between labels exceed the seed-to-seed spread.

The claims checked are those of the comparison table in the study notes (the project's source
document on positional encodings): absolute encodings are hard to generalise to other lengths,
relative ones are robust to length change, rotary ones generalise somewhat beyond the training
length and then degrade.
"""
from __future__ import annotations

from posemb.lab.summary import FAMILY_ORDER

# Verdict thresholds (nats/token of rise above the loss at L_train). A rise within the larger of
# HOLD_NATS and the seed spread is "holds": two seeds of the default study moved the rise of the
# steadiest schemes by <= 0.012 and of RoPE-trained models by up to 0.3 (docs/study.md).
HOLD_NATS = 0.05
GENTLE_NATS = 0.30
DEGRADE_NATS = 1.00
CLASSES = ("holds", "degrades gently", "degrades", "breaks down")

#: The study notes' comparison table: per family, its core idea and its claim about length.
STUDY_NOTES_TABLE = {
    "absolute": ("each position i gets a vector p_i, fixed (sin/cos) or learned, up to a maximum length",
                 "hard to generalise to other lengths"),
    "relative": ("an embedding per distance (j - i), added inside attention (keys, values, or a scalar bias)",
                 "robust to length change, truncation, reordering"),
    "rotary": ("rotate q and k by a position-dependent angle, so q.k depends on the distance",
               "generalises somewhat beyond the max length; far beyond it, quality drops"),
    "none": ("no positional signal: the causal mask alone (a baseline, not in the study notes' table)", "-"),
}


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


def final_class(rows: list[dict], label: str, train_length: int) -> str | None:
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
                    and r.get("variant") is None]
        pieces = []
        if in_range:
            low, best = min(in_range)
            high = max(in_range)[0]
            span = f"{low:.3f}" if len(in_range) == 1 else f"{low:.3f}-{high:.3f}"
            pieces.append(f"In range: loss {span} at L_train = {train_length}" +
                          (f" (best {best})" if len(in_range) > 1 else ""))
        pieces.append("Beyond it: " + "; ".join(scheme_phrase(rows, label, train_length) for label in labels))
        finals = {label: final_class(rows, label, train_length) for label in labels}
        claim = STUDY_NOTES_TABLE[family][1]
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
            pieces.append(f"The study notes' claim \"{claim}\": borne out by {len(agree)} of {len(considered)}"
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
    seed_counts = sorted({r["seeds"] for r in seeded})
    lines.append(f"Spread = max - min over the {', '.join(map(str, seed_counts))} seeds of each label; rows "
                 "`rope+X` are evaluated on the rope runs' weights, so they share its seeds and are not "
                 "independent of it." + (" With two seeds a spread is one difference of two draws: "
                                         "separated pairs are likely real, unseparated ones are undecided, "
                                         "not equal." if seed_counts == [2] else ""))
    in_range = [r for r in rows if r["eval_length"] == train_length and r["loss_spread"] is not None
                and r.get("variant") is None]
    if len(in_range) >= 2:
        spreads = sorted(r["loss_spread"] for r in in_range)
        pairs = [(a, b) for i, a in enumerate(in_range) for b in in_range[i + 1:]]
        apart = sum(1 for a, b in pairs if abs(a["loss"] - b["loss"]) > (a["loss_spread"] + b["loss_spread"]) / 2)
        lines.append(f"In range (loss at L_train = {train_length}, trained rows only): largest spread "
                     f"{spreads[-1]:.3f} ({max(in_range, key=lambda r: r['loss_spread'])['scheme']}), median "
                     f"{_median(spreads):.3f}; {apart} of {len(pairs)} pairs separated.")
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
                     f"({max(here, key=lambda r: r['rise_spread'])['scheme']}) | {_median(spreads):.3f} | "
                     f"{apart} of {len(pairs)} |")
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

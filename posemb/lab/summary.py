"""The study's numbers, aggregated: one row per (label, evaluation length) for ``--task lm``, one
per (label, length, depth) for ``--task passkey``, as means over seeds with their spreads.

A *label* is what a row of the report is about: a trained scheme (``rope``) or an inference-time
variant of one, evaluated on its weights without fine-tuning (``rope+yarn``). Each row says which
in explicit fields: ``base_scheme`` (the trained scheme) and ``variant`` (``None`` for the trained
scheme itself, else the variant's name), so no code has to parse the label.

Extrapolation is measured as the **rise** of a label's loss at a length above its own loss at the
training length: small models learn at different speeds, so raw loss at long lengths mixes
learning speed with extrapolation. With several seeds, ``*_spread`` is max - min over the seeds.
"""
from __future__ import annotations

import math
from typing import Any

from posemb.lab.evaluate import BEYOND_N_MAX

FAMILY_ORDER = ("absolute", "relative", "rotary", "none")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> float | None:
    return max(values) - min(values) if len(values) > 1 else None


def label_info(record: dict, label: str) -> dict:
    """``{"base_scheme", "variant"}`` of ``label`` in a run ``record`` (the trained scheme itself
    when the record does not describe the label)."""
    info = record.get("labels", {}).get(label)
    if info is not None:
        return info
    return {"base_scheme": record["scheme"], "variant": None}


def labels_in_order(records: list[dict]) -> list[str]:
    """Every evaluated label (schemes, then their variants), in first-seen order."""
    seen: list[str] = []
    for record in records:
        for label in record["eval"]:
            if label not in seen:
                seen.append(label)
    return seen


def family_sorted_labels(rows: list[dict]) -> list[str]:
    """Labels grouped by :data:`FAMILY_ORDER`, first-seen order within a family."""
    labels: list[str] = []
    for family in FAMILY_ORDER:
        for row in rows:
            if row["family"] == family and row["scheme"] not in labels:
                labels.append(row["scheme"])
    for row in rows:
        if row["scheme"] not in labels:
            labels.append(row["scheme"])
    return labels


def is_variant(rows: list[dict], label: str) -> bool:
    """Whether ``label`` is an inference-time variant (not a trained scheme) in ``rows``."""
    return any(r["scheme"] == label and r.get("variant") is not None for r in rows)


def summarize_lm(records: list[dict], train_length: int, eval_lengths: list[int]) -> list[dict]:
    """One row per (label, eval_length): means over seeds of loss, ppl and rise, with spreads."""
    rows = []
    for label in labels_in_order(records):
        runs = [r for r in records if label in r["eval"]]
        info = label_info(runs[0], label)
        variant = info["variant"]
        train_stats = [r["train"] for r in runs]
        for length in eval_lengths:
            entries = [r["eval"][label].get(str(length)) for r in runs]
            entries = [e for e in entries if e is not None]
            row: dict[str, Any] = {
                "scheme": label, "family": runs[0]["family"], "base_scheme": info["base_scheme"],
                "variant": variant, "train_length": train_length, "eval_length": length,
                "factor": length / train_length, "seeds": len(entries), "loss": None, "ppl": None, "rise": None,
                "loss_spread": None, "rise_spread": None, "tokens": None,
                "position_params": train_stats[0].get("position_params"),
                "train_tokens_per_s": None if variant is not None else mean([s["tokens_per_s"] for s in train_stats]),
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
            row.update(loss=mean(losses), loss_spread=spread(losses), tokens=entries[0].get("tokens"))
            row["ppl"] = math.exp(min(row["loss"], 700.0))
            if len(rises) == len(entries):
                row.update(rise=mean(rises), rise_spread=spread(rises))
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
        out.append({"start": bucket["start"], "stop": bucket["stop"], "loss": mean(values) if values else None})
    return out


def summarize_passkey(records: list[dict], train_length: int, eval_lengths: list[int]) -> list[dict]:
    """One row per (label, eval_length, depth): mean accuracy and key-digit loss over seeds."""
    rows = []
    for label in labels_in_order(records):
        runs = [r for r in records if label in r["eval"]]
        info = label_info(runs[0], label)
        for length in eval_lengths:
            per_seed = [r["eval"][label].get(str(length)) or [] for r in runs]
            depths = [d["depth"] for d in per_seed[0]] if per_seed and per_seed[0] else []
            for i, depth in enumerate(depths):
                entries = [p[i] for p in per_seed if i < len(p)]
                row: dict[str, Any] = {"scheme": label, "family": runs[0]["family"],
                                       "base_scheme": info["base_scheme"], "variant": info["variant"],
                                       "train_length": train_length, "eval_length": length, "depth": depth,
                                       "seeds": len(entries), "accuracy": None, "accuracy_spread": None,
                                       "loss": None, "ppl": None, "note": ""}
                if any(e.get("accuracy") is None for e in entries):
                    row["note"] = BEYOND_N_MAX if any(e.get("note") == BEYOND_N_MAX for e in entries) else "missing"
                else:
                    accuracy = [e["accuracy"] for e in entries]
                    row.update(accuracy=mean(accuracy), accuracy_spread=spread(accuracy),
                               loss=mean([e["loss"] for e in entries]))
                    row["ppl"] = math.exp(min(row["loss"], 700.0))
                rows.append(row)
    return rows

"""The suite's report, computed from the scores: ``report.md`` (task x scheme table in and out of
distribution, a ranking with the seed spread, the anchors' orderings checked), ``results.csv``
(one row per task, label, seed and test length), ``results.json`` and one accuracy-vs-length plot
per task (``accuracy_<task>.png``).

In distribution (ID) means the instance lengths trained on, ``1..L``; out of distribution (OOD)
the longer ones, ``L+1..kL``. Each ID / OOD number is the mean over those lengths of the accuracy
at each length (every length weighs the same, as in Ruoss et al. 2023). With several seeds every
number is the mean over seeds and ``[x]`` the spread (max - min over seeds). Two schemes are
*separated* when their seed ranges do not overlap: every seed of one scores above every seed of
the other.
"""
from __future__ import annotations

import csv
import io
import math

from posemb.lab.checkpoint import json_bytes

CSV_COLUMNS = ["task", "label", "family", "seed", "length", "split", "exact", "token", "count", "note"]
#: The ranking's score: OOD per-token accuracy averaged over tasks (Ruoss et al. 2023's measure;
#: it separates schemes whose exact match out of distribution is zero alike).
RANK_METRIC = "token"
ABSOLUTE = ("learned", "sinusoidal")


# ---- aggregation --------------------------------------------------------------------------------

def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values):
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) > 1 else None


def result_rows(records: list[dict], max_train_length: int) -> list[dict]:
    rows = []
    for record in records:
        for label, by_length in record["eval"].items():
            for n in sorted(by_length, key=int):
                result = by_length[n]
                rows.append({"task": record["task"], "label": label, "family": record["family"],
                             "seed": record["seed"], "length": int(n),
                             "split": "id" if int(n) <= max_train_length else "ood",
                             "exact": result["exact"], "token": result["token"], "count": result["count"],
                             "note": result.get("note", "")})
    return rows


def labels_in_order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["label"] not in seen:
            seen.append(row["label"])
    return seen


def split_means(rows: list[dict]) -> dict[tuple, dict]:
    """``(task, label, seed, split) -> {"exact", "token"}``: means over the split's lengths."""
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["task"], row["label"], row["seed"], row["split"]), []).append(row)
    return {key: {m: _mean([r[m] for r in group]) for m in ("exact", "token")} for key, group in grouped.items()}


def summarize(records: list[dict], max_train_length: int) -> dict:
    """Everything the report shows, as plain data (also written to ``results.json``)."""
    rows = result_rows(records, max_train_length)
    per_seed = split_means(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = labels_in_order(rows)
    seeds = sorted({r["seed"] for r in rows})
    table = []
    for label in labels:
        for task in tasks:
            cell = {"task": task, "label": label}
            for split in ("id", "ood"):
                for metric in ("exact", "token"):
                    values = [per_seed[(task, label, s, split)][metric] for s in seeds if (task, label, s, split) in per_seed]
                    cell[f"{split}_{metric}"] = _mean(values)
                    cell[f"{split}_{metric}_spread"] = _spread(values)
            table.append(cell)
    ranking = rank(per_seed, tasks, labels, seeds)
    return {"tasks": tasks, "labels": labels, "seeds": seeds, "table": table, "ranking": ranking,
            "anchors": anchor_checks(ranking), "rows": rows}


def seed_scores(per_seed: dict, tasks: list[str], label: str, seeds: list[int], split: str, metric: str) -> dict:
    """``seed -> mean over tasks`` of the split's accuracy, for the seeds that have every task."""
    scores = {}
    for seed in seeds:
        values = [per_seed.get((task, label, seed, split), {}).get(metric) for task in tasks]
        if values and all(v is not None for v in values):
            scores[seed] = sum(values) / len(values)
    return scores


def rank(per_seed: dict, tasks: list[str], labels: list[str], seeds: list[int]) -> list[dict]:
    """Labels by mean OOD per-token accuracy over tasks, best first, with each seed's score, the
    spread, and whether each is separated (seed ranges disjoint) from the next one down."""
    entries = []
    for label in labels:
        scores = seed_scores(per_seed, tasks, label, seeds, "ood", RANK_METRIC)
        if not scores:
            continue
        exact = seed_scores(per_seed, tasks, label, seeds, "ood", "exact")
        in_dist = seed_scores(per_seed, tasks, label, seeds, "id", RANK_METRIC)
        entries.append({"label": label, "score": _mean(list(scores.values())), "spread": _spread(list(scores.values())),
                        "seed_scores": {str(s): v for s, v in scores.items()},
                        "ood_exact": _mean(list(exact.values())), "id_token": _mean(list(in_dist.values()))})
    entries.sort(key=lambda e: -e["score"])
    tier = 1
    for index, entry in enumerate(entries):
        if index:
            previous = entries[index - 1]
            if previous["separated_from_next"]:
                tier += 1
        entry["tier"] = tier
        below = entries[index + 1] if index + 1 < len(entries) else None
        entry["separated_from_next"] = below is not None and separated(entry, below)
    return entries


def separated(upper: dict, lower: dict) -> bool:
    """Every seed of ``upper`` scores above every seed of ``lower`` (needs two seeds or more each)."""
    a, b = list(upper["seed_scores"].values()), list(lower["seed_scores"].values())
    return len(a) > 1 and len(b) > 1 and min(a) > max(b)


def compare(ranking: list[dict], first: str, second: str) -> dict | None:
    """Is ``first`` above ``second`` out of distribution: ``reproduced`` (seed ranges disjoint, first
    above), ``reversed`` (disjoint, first below), ``within noise`` (overlapping, or one seed)."""
    by_label = {e["label"]: e for e in ranking}
    if first not in by_label or second not in by_label:
        return None
    a, b = by_label[first], by_label[second]
    if separated(a, b):
        verdict = "reproduced"
    elif separated(b, a):
        verdict = "reversed"
    else:
        verdict = "within noise"
    return {"above": first, "below": second, "above_score": a["score"], "below_score": b["score"],
            "difference": a["score"] - b["score"], "verdict": verdict}


def anchor_checks(ranking: list[dict]) -> list[dict]:
    """The anchors' orderings out of distribution: NoPE and T5 above absolute embeddings
    (Kazemnejad et al. 2023), randomized positions above the same scheme without (Ruoss et al. 2023)."""
    checks = []
    labels = [e["label"] for e in ranking]
    for better in ("nope", "t5"):
        for worse in ABSOLUTE:
            found = compare(ranking, better, worse)
            if found:
                checks.append({"claim": f"{better} above {worse} (Kazemnejad et al. 2023)", **found})
    for label in labels:
        if label.endswith("+randomized"):
            found = compare(ranking, label, label.removesuffix("+randomized"))
            if found:
                checks.append({"claim": f"randomized positions help {label.removesuffix('+randomized')} "
                                        "(Ruoss et al. 2023)", **found})
    return checks


# ---- formatting ---------------------------------------------------------------------------------

def _pct(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    return text + (f" [{100 * spread:.1f}]" if spread is not None else "")


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    return buffer.getvalue()


def markdown(summary: dict, config, meta: dict) -> str:
    L, k = config.max_train_length, config.test_factor
    seeds = summary["seeds"]
    model, train = config.model, config.train
    out = io.StringIO()
    w = out.write
    w("# posemb tasks: length generalization on algorithmic tasks\n\n")
    compute = meta.get("run_seconds", 0.0)
    w(f"Each (task, scheme, seed) is a decoder-only transformer (dim {model.dim}, depth {model.depth}, "
      f"{model.heads} heads) trained for {train.steps} steps of {train.batch_size} instances whose length is drawn "
      f"uniformly from 1..{L} (L = {L}) per step, with the loss on the answer tokens only; then scored, "
      f"teacher-forced, on the same {config.test_samples} test instances per length at every length 1..{k * L}. "
      f"Seeds: {', '.join(map(str, seeds))}. Wall time of this invocation: {meta['wall_time']} "
      f"({meta['trained_now']} run(s) trained now, {meta['reused']} reused); training and scoring of all runs "
      f"took {compute / 60:.1f} min. Load average {meta['environment']['load_start']} at the start, "
      f"{meta['environment']['load_end'] or 'n/a'} at the end.\n\n")
    legend = ("Numbers are % (means over seeds; `[x]` is the seed-to-seed spread, max - min)." if len(seeds) > 1
              else "Numbers are %, one seed (no spread: differences cannot be told from seed noise).")
    for metric, title in (("exact", "Exact match (whole answer right)"), ("token", "Per-token accuracy")):
        w(f"## {title}: in distribution (ID, lengths 1..{L}) and out (OOD, {L + 1}..{k * L})\n\n{legend}\n\n")
        head = ["scheme"] + [f"{t} {s}" for t in summary["tasks"] for s in ("ID", "OOD")]
        w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        cells = {(c["task"], c["label"]): c for c in summary["table"]}
        for label in summary["labels"]:
            parts = [f"`{label}`"]
            for task in summary["tasks"]:
                cell = cells.get((task, label), {})
                for split in ("id", "ood"):
                    parts.append(_pct(cell.get(f"{split}_{metric}"), cell.get(f"{split}_{metric}_spread")))
            w("| " + " | ".join(parts) + " |\n")
        w("\n")
    w("## Ranking (computed from the numbers)\n\n")
    w("Score: OOD per-token accuracy, mean over the tasks above; per seed, then the mean over seeds. "
      "*Separated* means every seed of the scheme scores above every seed of the next one down; schemes "
      "not separated share a tier.\n\n")
    w("| rank | tier | scheme | OOD per-token | spread | per seed | OOD exact | ID per-token | separated from next |\n"
      "|---|---|---|---|---|---|---|---|---|\n")
    for index, e in enumerate(summary["ranking"], 1):
        per_seed = ", ".join(f"{s}: {100 * v:.1f}" for s, v in e["seed_scores"].items())
        last = index == len(summary["ranking"])
        w(f"| {index} | {e['tier']} | `{e['label']}` | {_pct(e['score'])} | {_pct(e['spread']) if e['spread'] is not None else '-'} "
          f"| {per_seed} | {_pct(e['ood_exact'])} | {_pct(e['id_token'])} | "
          f"{'-' if last else ('yes' if e['separated_from_next'] else 'no')} |\n")
    pairs = max(0, len(summary["ranking"]) - 1)
    split_pairs = sum(e["separated_from_next"] for e in summary["ranking"])
    w(f"\n{split_pairs} of {pairs} neighbouring pairs are separated beyond seed noise; "
      f"{len({e['tier'] for e in summary['ranking']})} tier(s).\n\n")
    w("## The anchors' orderings, checked\n\n")
    if summary["anchors"]:
        w("| claim (out of distribution) | score above | score below | difference | verdict |\n|---|---|---|---|---|\n")
        for c in summary["anchors"]:
            w(f"| {c['claim']} | {_pct(c['above_score'])} | {_pct(c['below_score'])} | "
              f"{100 * c['difference']:+.1f} | {c['verdict']} |\n")
    else:
        w("None of the anchors' pairs (nope or t5 against learned or sinusoidal; X+randomized against X) "
          "were run.\n")
    w("\n*reproduced*: seed ranges disjoint in the anchors' direction; *reversed*: disjoint the other way; "
      "*within noise*: they overlap (or one seed).\n\n## Accuracy by length\n\n")
    for task in summary["tasks"]:
        w(f"![{task}: accuracy by test length](accuracy_{task}.png)\n\n")
    w("## Configuration\n\n")
    w(f"- command: `{meta['command']}`\n- environment: torch {meta['environment']['torch']}, Python "
      f"{meta['environment']['python']}, {meta['environment']['device']}, {meta['environment']['threads']} threads, "
      f"world size {meta['environment']['world_size']}\n")
    w(f"- training: lr {train.lr}, warm-up {train.warmup_steps}, weight decay {train.weight_decay}, "
      f"clip {train.grad_clip}; positions 0..T-1, or sorted random subsets of [0, N) for `+randomized`, "
      "N = the longest test sequence (or --position-range)\n")
    return out.getvalue()


def accuracy_figure(summary: dict, task: str, max_train_length: int):
    """Exact match and per-token accuracy against the test length, one line per scheme (mean over
    seeds, the band spans the seeds), the training range shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # object API on Agg: no pyplot state, no GUI backend
    axes = figure.subplots(1, 2, sharex=True, sharey=True)
    rows = [r for r in summary["rows"] if r["task"] == task]
    for axis, metric, title in zip(axes, ("exact", "token"), ("exact match", "per-token accuracy")):
        for label in summary["labels"]:
            by_length: dict[int, list[float]] = {}
            for r in rows:
                if r["label"] == label and r[metric] is not None:
                    by_length.setdefault(r["length"], []).append(r[metric])
            if not by_length:
                continue
            lengths = sorted(by_length)
            means = [100 * sum(by_length[n]) / len(by_length[n]) for n in lengths]
            line, = axis.plot(lengths, means, marker=".", linewidth=1.2, label=label)
            if any(len(v) > 1 for v in by_length.values()):
                axis.fill_between(lengths, [100 * min(by_length[n]) for n in lengths],
                                  [100 * max(by_length[n]) for n in lengths], color=line.get_color(), alpha=0.15)
        axis.axvspan(0.5, max_train_length + 0.5, color="0.85", alpha=0.5, zorder=0)
        axis.set_title(f"{task}: {title}")
        axis.set_xlabel("instance length (shaded: trained on)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=7, ncol=2)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def render_report(config, records: list[dict], meta: dict, *, plots: bool = True) -> tuple[dict[str, bytes], dict]:
    """``({file name: bytes}, summary)``; plots only when ``plots`` (the partial report after each
    run skips them: they are the slow part)."""
    summary = summarize(records, config.max_train_length)
    meta = dict(meta, run_seconds=sum(r["train"].get("train_seconds", 0.0) + r.get("eval_seconds", 0.0)
                                      for r in records))
    files = {"report.md": markdown(summary, config, meta).encode("utf-8"),
             "results.csv": to_csv(summary["rows"]).encode("utf-8"),
             "results.json": json_bytes(_finite({"meta": meta, "summary": {k: v for k, v in summary.items() if k != "rows"},
                                                 "records": records}))}
    if plots:
        for task in summary["tasks"]:
            files[f"accuracy_{task}.png"] = _png(accuracy_figure(summary, task, config.max_train_length))
    return files, summary


def _finite(obj):
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

"""The study's report files, rendered from the summary rows: ``report.md`` (the study notes'
comparison table rebuilt from measurements, the rise table, verdicts, noise, configuration),
``results.csv``, ``results.json`` and the figures. Rendering returns bytes; the study writes them
into its output directory (:mod:`posemb.lab.outdir`), so nothing here touches the disk.
"""
from __future__ import annotations

import csv
import io

from posemb.lab.checkpoint import json_bytes
from posemb.lab.evaluate import BEYOND_N_MAX
from posemb.lab.figures import loss_by_position, passkey_accuracy, png_bytes, ppl_vs_length
from posemb.lab.summary import FAMILY_ORDER, family_sorted_labels, is_variant, mean, summarize_lm, summarize_passkey
from posemb.lab.verdicts import (DEGRADE_NATS, GENTLE_NATS, HOLD_NATS, STUDY_NOTES_TABLE, family_verdicts,
                                 final_class, separation_check)

FAMILY_TITLES = {"absolute": "Absolute", "relative": "Relative", "rotary": "Rotary (RoPE)", "none": "No position (NoPE)"}

#: The files of a report, by task: what a study claims in its output directory before any work.
REPORT_FILES = {
    "lm": ("report.md", "results.csv", "results.json", "ppl_vs_length.png", "loss_by_position.png"),
    "passkey": ("report.md", "results.csv", "results.json", "passkey_accuracy.png"),
}


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


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["loss"] is None:
        return row["note"] or "-"
    return f"{_with_spread(row['loss'], row['loss_spread'])} ({row['ppl']:.2f})"


def _measured_cell(rows: list[dict], label: str, train_length: int, longer: list[int]) -> str:
    final = final_class(rows, label, train_length)
    if final is None or not longer:
        return f"{label}: -"
    if final == "n/a":
        return f"{label}: {BEYOND_N_MAX}"
    return f"{label}: {final} at {longer[-1] // train_length}x"


def lm_markdown(rows: list[dict], meta: dict) -> str:
    train_length = meta["config"]["train"]["train_length"]
    lengths = sorted({r["eval_length"] for r in rows})
    by_key = {(r["scheme"], r["eval_length"]): r for r in rows}
    labels = family_sorted_labels(rows)
    seeds = meta["config"]["seeds"]
    out = io.StringIO()
    w = out.write
    w("# posemb study: positional schemes, measured\n\n")
    w(f"{len([l for l in labels if not is_variant(rows, l)])} schemes, each a decoder-only LM "
      f"(dim {meta['config']['model']['dim']}, depth {meta['config']['model']['depth']}, "
      f"{meta['config']['model']['heads']} heads) trained for {meta['config']['train']['steps']} steps of "
      f"{meta['config']['train']['batch_size']} x {train_length} bytes on {meta['data']}, "
      f"then scored on the same {meta['eval_tokens']:,} validation bytes cut into windows of "
      f"{', '.join(str(l) for l in lengths)} bytes. Seeds: {', '.join(str(s) for s in seeds)}. "
      f"Wall time of this invocation: {meta['wall_time']}.\n\n")
    legend = "Numbers are means over seeds; `[x]` is the seed-to-seed spread (max - min)." if len(seeds) > 1 \
        else "One seed: see the noise section below for how far to trust small differences."
    w("## The study notes' comparison table, rebuilt with measurements\n\n")
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
                            "eval only" if is_variant(rows, label) else (f"{tokps:,.0f}" if tokps else "-")]
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
            final = final_class(rows, label, train_length)
            w(f"| `{label}` | " + " | ".join(cells) + f" | {final or '-'} |\n")
    w(_rows_section(rows, meta))
    w("\n### Verdicts by family (computed from the numbers above)\n\n")
    verdicts = family_verdicts(rows, train_length)
    for family, text in verdicts.items():
        w(f"- **{FAMILY_TITLES[family]}**: {text}\n")
    w("\n### The study notes' claims beside the measurements\n\n")
    w("| family | core idea (study notes) | the notes' claim about length | measured |\n|---|---|---|---|\n")
    for family in FAMILY_ORDER:
        if family not in verdicts:
            continue
        idea, claim = STUDY_NOTES_TABLE[family]
        labels_here = [l for l in labels if by_key.get((l, lengths[0])) and by_key[(l, lengths[0])]["family"] == family]
        measured = "; ".join(_measured_cell(rows, l, train_length, longer) for l in labels_here)
        w(f"| {FAMILY_TITLES[family]} | {idea} | {claim} | {measured} |\n")
    w("\n## Seed-to-seed noise and separation\n\n")
    w(separation_check(rows, train_length) + "\n")
    w("\n## Plots\n\n![perplexity by evaluation length](ppl_vs_length.png)\n\n"
      "![loss by position at the longest length](loss_by_position.png)\n")
    w(_config_section(meta))
    return out.getvalue()


def _rows_section(rows: list[dict], meta: dict) -> str:
    """What the rows that are not one plainly trained scheme are (randomized positions, hybrids)."""
    from posemb.lab.evaluate import HYBRIDS, parse_row, row_scheme

    config = meta["config"]
    longest = max(config["eval_lengths"])
    lines = []
    for label in dict.fromkeys(r["scheme"] for r in rows if r.get("variant") is None):
        row = parse_row(label, allow_evaluation=False)
        if row.randomized:
            lines.append(f"- `{label}`: {row.base} trained with randomized positions (Ruoss et al. 2023): each training "
                         f"row's positions are a sorted random subset of [0, {longest}) (N = the longest evaluation "
                         f"length, so every evaluated position was drawn in training), redrawn every step; evaluated "
                         f"at the ordinary positions 0 .. L-1, what a user's model sees (the paper's code draws random "
                         f"positions at test time too; `posemb tasks` follows it).")
        if row.base in HYBRIDS:
            pattern = row_scheme(row, config["model"]["depth"])
            lines.append(f"- `{label}`: {HYBRIDS[row.base].source}; at depth {config['model']['depth']} the layers are "
                         f"{', '.join(pattern)}.")
    return ("\nRows not trained as one plain scheme:\n\n" + "\n".join(lines) + "\n") if lines else ""


def passkey_markdown(rows: list[dict], meta: dict) -> str:
    train_length = meta["config"]["train"]["train_length"]
    lengths = sorted({r["eval_length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    labels = family_sorted_labels(rows)
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
                cells.append(f"{mean([r['accuracy'] for r in found]):.2f}")
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


# ---- CSV --------------------------------------------------------------------------------------

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


def render_report(task: str, records: list[dict], meta: dict, *, plots: bool = True) -> tuple[list[dict], dict]:
    """``(rows, files)``: the summary rows and ``{file name: bytes}`` of the report (the figures
    only with ``plots``; the Markdown, CSV and JSON always)."""
    train_length = meta["config"]["train"]["train_length"]
    lengths = meta["config"]["eval_lengths"]
    files: dict[str, bytes] = {}
    if task == "passkey":
        rows = summarize_passkey(records, train_length, lengths)
        markdown, columns, verdicts = passkey_markdown(rows, meta), PASSKEY_COLUMNS, {}
        if plots:
            files["passkey_accuracy.png"] = png_bytes(passkey_accuracy(rows, train_length))
    else:
        rows = summarize_lm(records, train_length, lengths)
        markdown, columns = lm_markdown(rows, meta), LM_COLUMNS
        verdicts = family_verdicts(rows, train_length)
        if plots:
            files["ppl_vs_length.png"] = png_bytes(ppl_vs_length(rows, train_length))
            files["loss_by_position.png"] = png_bytes(loss_by_position(rows, train_length))
    files["results.csv"] = to_csv(rows, columns).encode("utf-8")
    files["results.json"] = json_bytes({**meta, "rows": rows, "verdicts": verdicts, "runs": records})
    files["report.md"] = markdown.encode("utf-8")
    return rows, files

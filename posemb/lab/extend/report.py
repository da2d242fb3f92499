"""The report of ``posemb extend``: ``report.md``, ``results.csv``, ``results.json`` and three plots.

One row per method, target length and fine-tune setting, plus ``base`` (the unchanged model).

Verdict of a row at its target length ``N`` (``p_N`` its perplexity there, ``p_0`` the unchanged
model's at the trained length ``L``):

* ``holds at N`` when ``p_N <= (1 + HOLD_TOLERANCE) · p_0``, ``degrades at N`` up to ``FAIL_RATIO · p_0``,
  ``fails at N`` beyond;
* the short-context cost is the row's perplexity at ``L`` over ``p_0``, minus 1: what the method
  costs on inputs the model already handled; stated when above ``HOLD_TOLERANCE / 2``;
* the passkey accuracy at ``N`` (mean over depths), when measured.

Claims (the papers' comparisons, each stated as reproduced, not reproduced or within noise): two
rows are compared on the same windows of the same text (paired), and a difference in mean loss
counts when it exceeds ``NOISE_SE`` standard errors of the paired per-window differences. That
is the noise of the text sample, not of training seeds: a second demo seed is the test of the latter.
"""
from __future__ import annotations

import csv
import io
import math

from posemb.lab.checkpoint import json_bytes
from posemb.lab.extend.measure import mean_accuracy
from posemb.lab.extend.methods import RopeGeometry, stretch_factors, method_setting

REPORT_FILES = ("report.md", "results.csv", "results.json", "ppl_vs_length.png", "passkey.png", "factors.png")
HOLD_TOLERANCE = 0.05
FAIL_RATIO = 1.5
NOISE_SE = 2.0
FIXED_RECIPES = ("linear", "ntk", "dynamic", "yarn", "llama3")


def ppl(row: dict, length: int) -> float:
    return row["ppl"][str(length)]["ppl"]


def paired_difference(a: dict, b: dict, length: int) -> tuple[float, float]:
    """``(loss_a - loss_b, standard error)`` at ``length`` over the shared windows (weighted by the
    tokens each window scores)."""
    wa, wb = a["ppl"][str(length)], b["ppl"][str(length)]
    stride = wa["stride"]
    weights = [length] + [stride] * (len(wa["window_losses"]) - 1)
    diffs = [x - y for x, y in zip(wa["window_losses"], wb["window_losses"])]
    total = sum(weights)
    mean = sum(w * d for w, d in zip(weights, diffs)) / total
    se = math.sqrt(sum((w * (d - mean)) ** 2 for w, d in zip(weights, diffs))) / total
    return mean, se


def compare(a: dict, b: dict, length: int) -> str:
    """``reproduced`` (a better than b beyond noise), ``not reproduced`` (worse beyond noise), or ``within noise``."""
    diff, se = paired_difference(a, b, length)
    if diff < -NOISE_SE * se:
        return "reproduced"
    if diff > NOISE_SE * se:
        return "not reproduced"
    return "within noise"


def verdict(row: dict, base: dict, trained: int) -> str:
    target = row["target"]
    ratio = ppl(row, target) / ppl(base, trained)
    word = "holds" if ratio <= 1 + HOLD_TOLERANCE else "degrades" if ratio <= FAIL_RATIO else "fails"
    text = f"{word} at {target} (ppl x{ratio:.3f} of the base at {trained})"
    cost = ppl(row, trained) / ppl(base, trained) - 1
    if cost > HOLD_TOLERANCE / 2:
        text += f"; short-context cost +{100 * cost:.1f}%"
    accuracy = mean_accuracy(row["passkey"], target)
    if accuracy is not None:
        text += f"; passkey {100 * accuracy:.0f}% at {target}"
    return text


def claims(rows: list[dict], trained: int) -> list[str]:
    """The closing note's three comparisons, computed: (a) ranking without fine-tuning per target,
    (b) interpolation + fine-tune vs extrapolation + the same fine-tune, (c) searched vs best fixed."""
    out = []
    targets = sorted({r["target"] for r in rows if r["target"] is not None})
    for target in targets:
        plain = sorted((r for r in rows if r["target"] == target and not r["finetune_steps"]),
                       key=lambda r: ppl(r, target))
        if plain:
            ranking = " < ".join(f"{r['method']} {ppl(r, target):.3f}" for r in plain)
            gap = ("only one method" if len(plain) < 2 else
                   "beyond noise" if compare(plain[0], plain[1], target) == "reproduced" else "within noise")
            out.append(f"(a) @{target}, no fine-tune, ppl: {ranking} (best vs second: {gap})")
        tuned = {r["method"]: r for r in rows if r["target"] == target and r["finetune_steps"]}
        if "none" in tuned:
            for method, row in tuned.items():
                if method == "none":
                    continue
                diff, se = paired_difference(row, tuned["none"], target)
                out.append(f"(b) @{target}, {row['finetune_steps']} fine-tune steps: {method} {ppl(row, target):.3f} vs "
                           f"none {ppl(tuned['none'], target):.3f} (loss {diff:+.4f} ± {se:.4f}): PI's claim "
                           f"{compare(row, tuned['none'], target)}")
        searched = next((r for r in plain if r["method"] == "longrope"), None)
        fixed = [r for r in plain if r["method"] in FIXED_RECIPES]
        if searched is not None and fixed:
            best = min(fixed, key=lambda r: ppl(r, target))
            diff, se = paired_difference(searched, best, target)
            out.append(f"(c) @{target}, no fine-tune: searched longrope {ppl(searched, target):.3f} vs best fixed "
                       f"{best['method']} {ppl(best, target):.3f} (loss {diff:+.4f} ± {se:.4f}): LongRoPE's claim "
                       f"{compare(searched, best, target)}")
    return out


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Flat rows for the CSV and the markdown table."""
    trained = meta["model"]["trained_length"]
    base = next(r for r in rows if r["method"] == "base")
    flat = []
    for row in rows:
        entry = {"label": row["label"], "method": row["method"], "target": row["target"] or "",
                 "finetune_steps": row["finetune_steps"]}
        for length in meta["eval_lengths"]:
            entry[f"ppl@{length}"] = ppl(row, length)
        for length in meta["passkey_lengths"]:
            entry[f"passkey@{length}"] = mean_accuracy(row["passkey"], length)
        entry["short_cost"] = ppl(row, trained) / ppl(base, trained) - 1
        entry["rope"] = row.get("describe", "trained frequencies")
        entry["attention_scale"] = row.get("attention_scale", 1.0)
        entry["verdict"] = "reference" if row["method"] == "base" else verdict(row, base, trained)
        flat.append(entry)
    return flat


def render_markdown(rows: list[dict], meta: dict) -> str:
    flat = table_rows(rows, meta)
    trained = meta["model"]["trained_length"]
    model = meta["model"]
    lines = ["# posemb extend", "",
             f"Model `{model['path']}` ({model['architecture']}, {model['num_parameters']:,} parameters, RoPE base "
             f"{model['rope_theta']:g}, rotary dim {model['rotary_dim']}), trained length {trained}.",
             f"Held-out text: {meta['corpus']} (measurement text: first half of the validation split; the search's "
             "fitness text: the second half).", "",
             "Perplexity: sliding windows with stride "
             f"{meta['config']['stride_fraction']:g} x the window (PI / YaRN protocol), "
             f"{meta['config']['eval_tokens']:,} tokens. Passkey: mean accuracy over depths "
             f"{list(meta['config']['passkey_depths'])}, {meta['config']['passkey_samples']} samples per cell.", ""]
    header = ["row", *[f"ppl @{n}" for n in meta["eval_lengths"]], *[f"passkey @{n}" for n in meta["passkey_lengths"]],
              "short-context cost", "RoPE", "attention scale", "verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in flat:
        cells = [f"`{entry['label']}`", *[_fmt(entry[f"ppl@{n}"]) for n in meta["eval_lengths"]],
                 *[_fmt(entry[f"passkey@{n}"], 2) for n in meta["passkey_lengths"]],
                 f"{100 * entry['short_cost']:+.1f}%", entry["rope"], f"{entry['attention_scale']:.4f}", entry["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Claims, computed", ""]
    lines += [f"- {c}" for c in claims(rows, trained)] or ["- (no comparison applies to these rows)"]
    lines += ["", f"Verdicts: holds when ppl at the target is within {HOLD_TOLERANCE:.0%} of the base model's at the "
              f"trained length, degrades up to x{FAIL_RATIO}, fails beyond. Differences count beyond {NOISE_SE:g} "
              "paired standard errors over windows (text-sampling noise, not seed noise).", ""]
    for target, search in sorted(meta.get("searches", {}).items()):
        if search:
            seed = search["seed_best"]
            lines.append(f"LongRoPE search @{target}: {len(search['evaluations'])} evaluations (seed "
                         f"{search['config']['seed']}), best fitness {search['best']['fitness']:.4f} "
                         f"({search['best']['origin']}), best seed point {seed['fitness']:.4f} ({seed['origin']}).")
    if meta.get("export"):
        e = meta["export"]
        lines += ["", f"Exported `{e['label']}` to `{e['dir']}` (rope_type {e['rope_parameters']['rope_type']}, "
                  f"max_position_embeddings {e['max_position_embeddings']})."]
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    lines += ["", f"Wall time of this invocation: {meta['wall_seconds']:.0f} s (a rerun reuses finished "
              "measurements, searches and fine-tunes)."]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict], meta: dict) -> str:
    flat = table_rows(rows, meta)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _plot_ppl(rows: list[dict], meta: dict):
    from posemb.lab.figures import new_figure

    targets = sorted({r["target"] for r in rows if r["target"] is not None})
    figure = new_figure(5.5 * len(targets), 4.2, layout="constrained")
    base = next(r for r in rows if r["method"] == "base")
    lengths = meta["eval_lengths"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "base"))
    from matplotlib import colormaps

    colors = {m: colormaps["tab10"].colors[i % 10] for i, m in enumerate(methods)}
    for i, target in enumerate(targets):
        ax = figure.add_subplot(1, len(targets), i + 1)
        ax.plot(lengths, [ppl(base, n) for n in lengths], color="black", lw=2, label="base (unchanged)")
        for row in rows:
            if row["target"] != target:
                continue
            ax.plot(lengths, [ppl(row, n) for n in lengths], color=colors[row["method"]],
                    ls="--" if row["finetune_steps"] else "-", marker="o", ms=3,
                    label=row["method"] + (f" +ft{row['finetune_steps']}" if row["finetune_steps"] else ""))
        ax.axvline(meta["model"]["trained_length"], color="grey", lw=0.8, ls=":")
        ax.axvline(target, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"target {target}")
        ax.set_xlabel("window length (tokens)")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=6)
    return figure


def _plot_passkey(rows: list[dict], meta: dict):
    from posemb.lab.figures import new_figure

    shown = [r for r in rows if r["passkey"]]
    if not shown:
        figure = new_figure(3, 1)
        figure.text(0.5, 0.5, "passkey not measured", ha="center")
        return figure
    columns = min(4, len(shown))
    lines = math.ceil(len(shown) / columns)
    figure = new_figure(3.2 * columns, 2.6 * lines, layout="constrained")
    lengths = meta["passkey_lengths"]
    depths = sorted({c["depth"] for c in shown[0]["passkey"]})
    image = None
    for i, row in enumerate(shown):
        ax = figure.add_subplot(lines, columns, i + 1)
        grid = [[next(c["accuracy"] for c in row["passkey"] if c["length"] == n and c["depth"] == d) for n in lengths]
                for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        ax.set_title(row["label"], fontsize=8)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    figure.colorbar(image, ax=figure.axes, shrink=0.6, label="accuracy")
    return figure


def _plot_factors(rows: list[dict], meta: dict, geometry: RopeGeometry):
    from posemb.lab.figures import new_figure

    targets = sorted({r["target"] for r in rows if r["target"] is not None})
    figure = new_figure(5.5 * len(targets), 4.0, layout="constrained")
    for i, target in enumerate(targets):
        ax = figure.add_subplot(1, len(targets), i + 1)
        for method in ("linear", "ntk", "yarn", "llama3", "dynamic"):
            factors = stretch_factors(method_setting(method, geometry, target), geometry)
            ax.plot(range(len(factors)), factors.tolist(), label=method, lw=1)
        search = meta.get("searches", {}).get(str(target))
        if search:
            ax.plot(range(geometry.num_pairs), search["best"]["factors"], color="black", lw=2, label="longrope (searched)")
        ax.set_yscale("log", base=2)
        ax.set_title(f"stretch per pair, target {target}")
        ax.set_xlabel("pair j (fast -> slow)")
        ax.set_ylabel("inv_freq / inv_freq_method")
        ax.legend(fontsize=7)
    return figure


def render_all(out_dir, rows: list[dict], meta: dict, geometry: RopeGeometry, *, plots: bool = True) -> None:
    """Write every report file into the claimed :class:`~posemb.lab.outdir.OutputDir`."""
    from posemb.lab.figures import png_bytes

    out_dir.write_bytes("report.md", render_markdown(rows, meta).encode())
    out_dir.write_bytes("results.csv", render_csv(rows, meta).encode())
    out_dir.write_bytes("results.json", json_bytes({"meta": meta, "rows": rows, "claims": claims(rows, meta["model"]["trained_length"])}))
    if plots:
        out_dir.write_bytes("ppl_vs_length.png", png_bytes(_plot_ppl(rows, meta)))
        out_dir.write_bytes("passkey.png", png_bytes(_plot_passkey(rows, meta)))
        out_dir.write_bytes("factors.png", png_bytes(_plot_factors(rows, meta, geometry)))

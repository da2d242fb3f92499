"""The ``posemb extend`` workflow: check everything, search, fine-tune, measure, report, export.

Layout of the output directory (``--out``, default ``./extend-report``)::

    report.md  results.csv  results.json  ppl_vs_length.png  passkey.png  factors.png
    .posemb-manifest.json  .posemb.lock       (posemb.lab.outdir: what posemb wrote here; one writer)
    measurements/<key>.json   one per measured row (method, target, fine-tune, evaluation settings)
    search/target<N>.json     the LongRoPE search state, written after every evaluation
    finetune/<key>.pt         fine-tune checkpoints (weights, optimizer, step)
    export_probe.pt           input ids and the logits posemb measured for the exported folder

Everything that can be refused is refused before any work (:meth:`ExtendConfig.validate`,
:func:`prepare`): MODEL (folder, config, weights, RoPE), each target length (above the trained
length), each method, the export directory, the output directory (locked; report files that posemb
did not write are not replaced without ``--force``), the data (enough held-out tokens).

Rows: the unchanged model (``base``), then each method at each target length, and with
``--finetune-steps`` each fine-tuned method too. A rerun of the same command reuses every finished
measurement, continues an unfinished search or fine-tune from its state file or checkpoint.

Held-out text: the first half of the validation split is the measurement text, the second half the
search's fitness text, so the searched factors are never scored on the text that chose them.

Under ``torchrun`` the fine-tunes are data-parallel; rank 0 alone searches, measures and writes,
the other ranks wait for it (its search result is broadcast before the fine-tunes).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from posemb._validation import check_choice, check_int
from posemb.lab import passkey
from posemb.lab.checkpoint import atomic_write_json, load_checkpoint, read_json, torch_bytes
from posemb.lab.data import load_corpus
from posemb.lab.distributed import barrier, broadcast_from_main, dist_info, init_distributed, resolve_device
from posemb.lab.extend import methods as M
from posemb.lab.extend.codec import Codec
from posemb.lab.extend.export import META_NAME, check_export_dir, write_export
from posemb.lab.extend.finetune import FinetuneConfig, finetune
from posemb.lab.extend.hf_model import (LogitsOnly, ModelInfo, apply_setting, inspect_folder, load_model,
                                        resolve_dtype)
from posemb.lab.extend.measure import passkey_grid, sliding_window_perplexity
from posemb.lab.extend.report import REPORT_FILES, render_all
from posemb.lab.extend.search import SearchConfig, run_search
from posemb.lab.outdir import OutputDir
from posemb.lab.progress import format_seconds

MAX_LENGTH = 1 << 22
DEFAULT_DEPTHS = passkey.DEFAULT_DEPTHS


@dataclass
class ExtendConfig:
    model: str
    target_lengths: tuple[int, ...]
    methods: tuple[str, ...] = M.METHODS
    out: str = "extend-report"
    data: str | None = None
    trained_length: int | None = None
    eval_lengths: tuple[int, ...] = ()      #: default: trained length x 1, 2, 4, ... up to 2 x the longest target
    eval_tokens: int = 16_384
    stride_fraction: float = 0.5           #: stride = this x the window length
    passkey_lengths: tuple[int, ...] = ()   #: default: trained length x 1, 2, 4, ... up to the longest target
    passkey_depths: tuple[float, ...] = DEFAULT_DEPTHS
    passkey_samples: int = 10
    search: SearchConfig = field(default_factory=SearchConfig)
    search_tokens: int = 8_192
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune_methods: tuple[str, ...] = ()  #: default: every method in ``methods``
    export: str | None = None
    export_method: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    batch_tokens: int = 16_384
    checkpoint_every_s: float = 30.0
    progress: bool = True
    force: bool = False
    #: the demo reruns into its own export folder: one written by posemb extend is replaced without --force
    replace_own_export: bool = False
    plots: bool = True

    def validate(self) -> "ExtendConfig":
        """The checks that need no file: lengths, methods, sizes."""
        if not self.target_lengths:
            raise ValueError("--target-length must name at least one length")
        for length in self.target_lengths:
            check_int("--target-length", length, minimum=2, maximum=MAX_LENGTH)
        if not self.methods:
            raise ValueError(f"--methods must name at least one of {list(M.METHODS)}")
        for method in (*self.methods, *self.finetune_methods):
            check_choice("--methods", method, M.METHODS)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods must not repeat, got {list(self.methods)}")
        if self.finetune_methods and not self.finetune.steps:
            raise ValueError("--finetune-methods needs --finetune-steps >= 1 (no fine-tune was asked for)")
        extra = sorted(set(self.finetune_methods) - set(self.methods))
        if extra:
            raise ValueError(f"--finetune-methods {extra} are not among --methods {list(self.methods)}")
        for length in (*self.eval_lengths, *self.passkey_lengths):
            check_int("evaluation length", length, minimum=2, maximum=MAX_LENGTH)
        check_int("--eval-tokens", self.eval_tokens, minimum=2)
        check_int("--search-tokens", self.search_tokens, minimum=2)
        check_int("--passkey-samples", self.passkey_samples, minimum=0)
        check_int("--batch-tokens", self.batch_tokens, minimum=1)
        if not 0.0 < self.stride_fraction <= 1.0:
            raise ValueError(f"--stride-fraction must be in (0, 1], got {self.stride_fraction}")
        for depth in self.passkey_depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"passkey depths must be in [0, 1], got {depth}")
        self.search.validate()
        self.finetune.validate()
        if "longrope" in self.methods and self.search.budget < 3:
            raise ValueError(f"--search-budget must be >= 3 (the PI, NTK and YaRN seed points), got {self.search.budget}")
        if self.export_method is not None:
            check_choice("--export-method", self.export_method, self.methods)
        if self.threads is not None:
            check_int("--threads", self.threads, minimum=1)
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["search"], data["finetune"] = asdict(self.search), asdict(self.finetune)
        return data


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _doublings(start: int, stop: int) -> tuple[int, ...]:
    out, length = [], start
    while length <= stop:
        out.append(length)
        length *= 2
    return tuple(out)


@dataclass
class Plan:
    """What :func:`prepare` found and decided, before any work."""

    info: ModelInfo
    codec: Codec
    device: str
    dtype: torch.dtype
    eval_lengths: tuple[int, ...]
    passkey_lengths: tuple[int, ...]
    eval_text: torch.Tensor
    search_text: torch.Tensor
    train_tokens: torch.Tensor | None
    corpus: str


def prepare(config: ExtendConfig) -> Plan:
    """Every check that reads a file, in the order a user would fix them; no model weights are read."""
    config.validate()
    info = inspect_folder(config.model, trained_length=config.trained_length)
    trained = info.geometry.trained_length
    for target in config.target_lengths:
        if target <= trained:
            raise ValueError(f"--target-length {target} must be above the trained length {trained} "
                             f"(config max_position_embeddings of {config.model!r}, or --trained-length)")
    if config.export is not None:
        own = config.replace_own_export and (Path(config.export) / META_NAME).is_file()
        check_export_dir(config.export, model_folder=config.model, force=config.force or own)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    longest = max(config.target_lengths)
    eval_lengths = tuple(sorted(set(config.eval_lengths or _doublings(trained, 2 * longest)) | {trained}
                                | set(config.target_lengths)))
    passkey_lengths = tuple(sorted(set(config.passkey_lengths or _doublings(trained, longest))))
    codec = Codec(info)
    if codec.byte_level and config.passkey_samples:
        short = [n for n in passkey_lengths if n < passkey.minimum_length()]
        if not config.passkey_lengths:  # defaults too short for a needle are left out, not refused
            passkey_lengths = tuple(n for n in passkey_lengths if n >= passkey.minimum_length())
        elif short:
            raise ValueError(f"passkey lengths must be >= {passkey.minimum_length()} bytes, got {short}")
    corpus = load_corpus(config.data)
    half = corpus.validation.numel() // 2
    need_eval = max(config.eval_tokens, max(eval_lengths)) + 1
    need_search = max(config.search_tokens, longest) + 1
    eval_text = codec.from_bytes(corpus.validation[:half], need_eval)
    search_text = codec.from_bytes(corpus.validation[half:], need_search)
    if eval_text.numel() < need_eval or search_text.numel() < need_search:
        raise ValueError(f"the validation split of {corpus.source} gives {eval_text.numel()} measurement and "
                         f"{search_text.numel()} search tokens; need {need_eval} and {need_search}: use more --data "
                         "or fewer --eval-tokens / --search-tokens")
    train_tokens = None
    if config.finetune.steps:
        needed = 64 * longest * config.finetune.batch_size  # plenty of distinct windows for a short fine-tune
        train_tokens = codec.from_bytes(corpus.train, None if codec.byte_level else needed)
        if train_tokens.numel() < longest + 1:
            raise ValueError(f"the training split has {train_tokens.numel()} tokens; fine-tuning at {longest} needs more")
    return Plan(info, codec, device, dtype, eval_lengths, passkey_lengths, eval_text, search_text, train_tokens,
                corpus.describe())


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and dist_info().is_main
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[extend | {format_seconds(time.perf_counter() - self.start)}] {message}", file=sys.stderr,
                  flush=True)


def _measure(model, config: ExtendConfig, plan: Plan, lengths) -> dict:
    fn = LogitsOnly(model)
    ppl = {}
    for length in lengths:
        stride = max(1, int(length * config.stride_fraction))
        ppl[str(length)] = sliding_window_perplexity(fn, plan.eval_text, length, stride, device=plan.device,
                                                     batch_tokens=config.batch_tokens)
    cells = []
    if config.passkey_samples:
        cells = passkey_grid(fn, plan.codec, plan.passkey_lengths, config.passkey_depths,
                             samples=config.passkey_samples, seed=config.finetune.seed, device=plan.device,
                             batch_tokens=config.batch_tokens)
    return {"ppl": ppl, "passkey": cells}


def run_extend(config: ExtendConfig, *, command: str | None = None) -> dict:
    """Run (or resume) ``posemb extend``; returns ``{"out", "rows", "export", "wall_seconds"}``."""
    wall = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    plan = prepare(config)
    info = init_distributed(plan.device)
    out_dir = None
    if info.is_main:
        identity = _hash({"model": plan.info.fingerprint, "config": {k: v for k, v in config.to_dict().items()
                          if k not in ("out", "device", "threads", "progress", "force", "checkpoint_every_s")}})
        out_dir = OutputDir(config.out, identity=identity, argument="--out")
        out_dir.open()
    try:
        if out_dir is not None:
            out_dir.claim(list(REPORT_FILES) + ["export_probe.pt"], force=config.force)
        return _run(config, plan, out_dir, command, wall)
    finally:
        if out_dir is not None:
            out_dir.close()


def _run(config: ExtendConfig, plan: Plan, out_dir: OutputDir | None, command: str | None, wall: float) -> dict:
    log = _Log(config.progress)
    main = dist_info().is_main
    out = Path(config.out)
    geometry = plan.info.geometry
    log(f"{plan.info.architecture} ({plan.info.num_parameters:,} parameters), trained length "
        f"{geometry.trained_length}, targets {list(config.target_lengths)}, methods {list(config.methods)}")
    model = load_model(config.model, device=plan.device, dtype=plan.dtype, trained_length=config.trained_length)
    eval_identity = {"model": plan.info.fingerprint, "eval_lengths": plan.eval_lengths,
                     "eval_tokens": config.eval_tokens, "stride_fraction": config.stride_fraction,
                     "passkey": [plan.passkey_lengths, config.passkey_depths, config.passkey_samples,
                                 config.finetune.seed], "data": config.data, "dtype": str(plan.dtype)}

    # ---- LongRoPE search, one per target ----
    searches: dict[int, dict] = {}
    if "longrope" in config.methods:
        for target in config.target_lengths:
            result = None
            if main:
                seeds = M.seed_factor_vectors(geometry, target)
                fitness_stride = max(1, int(target * config.stride_fraction))

                def fitness(factors, target=target, stride=fitness_stride):
                    apply_setting(model, M.method_setting("longrope", geometry, target, long_factor=factors))
                    return sliding_window_perplexity(LogitsOnly(model), plan.search_text, target, stride,
                                                     device=plan.device, batch_tokens=config.batch_tokens)["ppl"]

                def report(record, target=target):
                    value = "inf" if record["fitness"] is None else f"{record['fitness']:.4f}"
                    log(f"search @{target}: #{record['index']} ({record['origin']}) ppl {value}")

                context = {"model": plan.info.fingerprint, "target": target, "search_tokens": config.search_tokens,
                           "stride_fraction": config.stride_fraction, "data": config.data, "dtype": str(plan.dtype)}
                result = run_search(fitness, seeds, config.search, extension_ratio=target / geometry.trained_length,
                                    state_path=out / "search" / f"target{target}.json", context=context,
                                    on_evaluation=report)
            searches[target] = broadcast_from_main(result)

    def setting(method: str, target: int) -> M.MethodSetting:
        factors = searches[target]["best"]["factors"] if method == "longrope" else None
        return M.method_setting(method, geometry, target, long_factor=factors)

    # ---- rows ----
    base_setting = {"rope_parameters": {"rope_type": "default", "rope_theta": geometry.base, **geometry.carried},
                    "max_position_embeddings": geometry.trained_length}
    specs = [{"label": "base", "method": "base", "target": None, "finetune_steps": 0, "setting": base_setting}]
    ft_methods = config.finetune_methods or config.methods
    for target in config.target_lengths:
        for method in config.methods:
            s = setting(method, target)
            specs.append({"label": f"{method}@{target}", "method": method, "target": target, "finetune_steps": 0,
                          "setting": s.to_dict()})
            if config.finetune.steps and method in ft_methods:
                specs.append({"label": f"{method}@{target}+ft{config.finetune.steps}", "method": method,
                              "target": target, "finetune_steps": config.finetune.steps, "setting": s.to_dict()})

    finetuned_weights: dict[str, Path] = {}
    rows = []
    for spec in specs:
        ft_identity = None
        if spec["finetune_steps"]:
            ft_identity = {"finetune": asdict(config.finetune), "setting": spec["setting"],
                           "model": plan.info.fingerprint, "data": config.data, "dtype": str(plan.dtype)}
        key = _hash({"eval": eval_identity, "setting": spec["setting"], "finetune": ft_identity})
        measured_path = out / "measurements" / f"{spec['label'].replace('@', '-at-')}-{key}.json"
        checkpoint = out / "finetune" / f"{spec['label'].replace('@', '-at-')}-{_hash(ft_identity)}.pt"
        if ft_identity is not None:
            finetuned_weights[spec["label"]] = checkpoint
        cached = read_json(measured_path) if measured_path.exists() else None
        if cached is not None and cached.get("key") == key:
            rows.append(cached)
            log(f"{spec['label']}: reused")
            continue
        target_model = model
        if ft_identity is not None:
            log(f"{spec['label']}: fine-tuning {config.finetune.steps} steps at {spec['target']}")
            target_model = load_model(config.model, device=plan.device, dtype=plan.dtype,
                                      trained_length=config.trained_length)
            apply_setting(target_model, setting(spec["method"], spec["target"]))
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            result = finetune(target_model, plan.train_tokens, spec["target"], config.finetune, device=plan.device,
                              checkpoint_path=checkpoint, checkpoint_every_s=config.checkpoint_every_s,
                              progress=config.progress, name=spec["label"])
            spec_train = result.to_dict()
        else:
            spec_train = None
            if spec["method"] == "base":
                apply_setting(target_model, M.MethodSetting("none", geometry.trained_length,
                                                            base_setting["rope_parameters"],
                                                            geometry.trained_length, 1.0))
            else:
                apply_setting(target_model, setting(spec["method"], spec["target"]))
        if main:
            log(f"{spec['label']}: measuring")
            measured = _measure(target_model, config, plan, plan.eval_lengths)
            row = {"key": key, "label": spec["label"], "method": spec["method"], "target": spec["target"],
                   "finetune_steps": spec["finetune_steps"], "setting": spec["setting"], "finetune": spec_train,
                   **measured}
            if spec["method"] not in ("base",):
                s = setting(spec["method"], spec["target"])
                row["stretch"] = [float(v) for v in M.stretch_factors(s, geometry)]
                row["attention_scale"] = M.attention_scale(s, geometry)
                row["describe"] = M.describe(s, geometry)
            atomic_write_json(measured_path, row)
            rows.append(row)
        barrier()
        if target_model is not model:
            del target_model

    result = {"out": str(out), "rows": rows, "export": None}
    if main:
        meta = {"command": command, "model": plan.info.to_dict(), "corpus": plan.corpus,
                "eval_lengths": list(plan.eval_lengths), "passkey_lengths": list(plan.passkey_lengths),
                "config": config.to_dict(), "torch": torch.__version__,
                "searches": {str(k): v for k, v in searches.items()}}
        export_info = None
        if config.export is not None:
            export_info = _export(config, plan, rows, finetuned_weights, setting, out_dir, log)
            result["export"] = export_info
        meta["export"] = export_info
        meta["wall_seconds"] = time.perf_counter() - wall
        render_all(out_dir, rows, meta, geometry, plots=config.plots)
        log(f"report: {out / 'report.md'}")
    barrier()
    result["wall_seconds"] = time.perf_counter() - wall
    return result


def choose_export_row(rows: list[dict], target: int, method: str | None) -> dict:
    """The row to export: at ``target``, of ``method`` if given (else any), fine-tuned rows first
    when there are any, then the lowest perplexity at the target."""
    candidates = [r for r in rows if r["target"] == target and (method is None or r["method"] == method)]
    tuned = [r for r in candidates if r["finetune_steps"]]
    pool = tuned or candidates
    return min(pool, key=lambda r: (r["ppl"][str(target)]["ppl"], r["label"]))


def _export(config, plan, rows, finetuned_weights, setting, out_dir, log) -> dict:
    target = max(config.target_lengths)
    row = choose_export_row(rows, target, config.export_method)
    model = load_model(config.model, device=plan.device, dtype=plan.dtype, trained_length=config.trained_length)
    if row["finetune_steps"]:
        state = load_checkpoint(finetuned_weights[row["label"]], map_location=plan.device)
        LogitsOnly(model).load_state_dict(state["model"])
    apply_setting(model, setting(row["method"], target))
    probe = plan.eval_text[: target].long()[None].to(plan.device)
    with torch.inference_mode():
        logits = LogitsOnly(model)(probe).float().cpu()
    meta = {"method": row["method"], "label": row["label"], "target_length": target,
            "finetune_steps": row["finetune_steps"], "rope_parameters": row["setting"]["rope_parameters"],
            "max_position_embeddings": row["setting"]["max_position_embeddings"],
            "ppl_at_target": row["ppl"][str(target)]["ppl"], "source_model": plan.info.to_dict()}
    write_export(model, config.export, model_folder=config.model, meta=meta)
    out_dir.write_bytes("export_probe.pt", torch_bytes({"input_ids": probe.cpu(), "logits": logits,
                                                        "label": row["label"]}))
    log(f"exported {row['label']} to {config.export}")
    return {"dir": str(config.export), **meta}

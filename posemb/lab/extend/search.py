"""LongRoPE-style evolutionary search of per-pair RoPE stretch factors (Ding et al. 2024, "LongRoPE",
arXiv 2402.13753, §3.2 and Algorithm 1; microsoft/LongRoPE ``evolution/search.py``).

A candidate is a ``long_factor`` list: one stretch factor per rotary pair, each in ``[1, max_factor]``
and non-decreasing with the pair index (the paper's monotonicity constraint). Its fitness is a
perplexity at the target length on held-out text (lower is better), measured by the caller's
``fitness(factors)``.

Steady-state evolution, one candidate per evaluation, so a budget counts evaluations exactly:

1. the seed points (PI, NTK and YaRN's factor vectors, :func:`posemb.lab.extend.methods.seed_factor_vectors`)
   are evaluated first;
2. every later candidate is made from the ``population`` best so far (ties: the earlier one): with
   probability ``crossover_rate`` a crossover of two parents (each pair's factor from one or the
   other) then a mutation, else a mutation of one parent picked by a tournament of two; a mutation
   multiplies each factor, with probability ``mutation_rate``, by ``exp(N(0, mutation_scale²))``;
3. the child is made valid by clamping to ``[1, max_factor]`` and a running maximum (monotone); a
   child equal to one already evaluated reuses its fitness (no model call).

Reproducible and resumable: candidate ``i`` is drawn from a generator seeded by ``(seed, i)`` and
the evaluations before it, which the state file holds. The state is written atomically after every
evaluation, so a search killed at any point and rerun continues where it stopped and ends exactly
where an uninterrupted one would. The best point is the minimum over all evaluations, seeds
included, so it is never worse than the best seed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from posemb._validation import check_float, check_int
from posemb.lab.checkpoint import atomic_write_json, read_json
from posemb.lab.errors import LabError
from posemb.lab.extend.methods import check_factors

STATE_FORMAT = 1


@dataclass(frozen=True)
class SearchConfig:
    budget: int = 32             #: evaluations in all, seed points included
    seed: int = 0
    population: int = 8          #: parents are drawn from this many best points
    crossover_rate: float = 0.3
    mutation_rate: float = 0.3   #: chance that each pair's factor is mutated
    mutation_scale: float = 0.15  #: standard deviation of the log-factor change
    max_factor_ratio: float = 2.0  #: factors are kept <= this x the extension ratio s

    def validate(self) -> "SearchConfig":
        check_int("search budget", self.budget, minimum=1)
        check_int("search seed", self.seed, minimum=0)
        check_int("search population", self.population, minimum=1)
        check_float("search crossover_rate", self.crossover_rate, minimum=0.0, maximum=1.0)
        check_float("search mutation_rate", self.mutation_rate, minimum=0.0, maximum=1.0)
        check_float("search mutation_scale", self.mutation_scale, minimum=0.0)
        check_float("search max_factor_ratio", self.max_factor_ratio, minimum=1.0)
        return self


class SearchStateError(LabError):
    """A search state file that belongs to another search."""


def repair(factors: np.ndarray, max_factor: float) -> list[float]:
    """Clamp to ``[1, max_factor]`` and make non-decreasing (running maximum)."""
    clipped = np.clip(np.asarray(factors, dtype=np.float64), 1.0, max_factor)
    return [float(v) for v in np.maximum.accumulate(clipped)]


def _ranked(evaluations: list[dict]) -> list[dict]:
    finite = [e for e in evaluations if e["fitness"] is not None]
    return sorted(finite, key=lambda e: (e["fitness"], e["index"]))


def propose(index: int, evaluations: list[dict], config: SearchConfig, max_factor: float) -> tuple[list[float], str]:
    """Candidate ``index`` (after the seeds) from the points evaluated so far, and how it was made."""
    rng = np.random.default_rng([config.seed, index])
    pool = _ranked(evaluations)[: config.population] or evaluations[:1]

    def tournament() -> dict:
        a, b = rng.integers(len(pool)), rng.integers(len(pool))
        return pool[min(a, b)]  # pool is sorted: the lower rank is the fitter one

    if len(pool) >= 2 and rng.random() < config.crossover_rate:
        first, second = rng.choice(len(pool), size=2, replace=False)
        mask = rng.random(len(pool[first]["factors"])) < 0.5
        child = np.where(mask, pool[first]["factors"], pool[second]["factors"])
        origin = f"crossover of #{pool[first]['index']} and #{pool[second]['index']}"
    else:
        parent = tournament()
        child = np.asarray(parent["factors"], dtype=np.float64)
        origin = f"mutation of #{parent['index']}"
    mutate = rng.random(child.shape[0]) < config.mutation_rate
    if not mutate.any():
        mutate[rng.integers(child.shape[0])] = True  # every child differs from its parents somewhere
    child = child * np.where(mutate, np.exp(rng.normal(0.0, config.mutation_scale, child.shape[0])), 1.0)
    return repair(child, max_factor), origin


def _identity(config: SearchConfig, seeds: dict[str, list[float]], context: dict) -> str:
    fields = {k: v for k, v in asdict(config).items() if k != "budget"}  # a larger budget continues a search
    text = json.dumps({"config": fields, "seeds": seeds, "context": context}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def run_search(fitness: Callable[[list[float]], float], seeds: dict[str, Sequence[float]], config: SearchConfig, *,
               extension_ratio: float, state_path: str | os.PathLike | None = None, context: dict | None = None,
               on_evaluation: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the search; returns ``{"best", "evaluations", "seed_best", "config"}``.

    ``seeds`` maps a name to a factor vector (all the same length, valid); ``extension_ratio`` is
    ``s = target / trained length`` (factors are bounded by ``max_factor_ratio * s``); ``context``
    describes what the fitness measures (model, target, text), so a state file from another search
    is refused instead of continued. Non-finite fitness counts as worst.
    """
    config.validate()
    if not seeds:
        raise ValueError("the search needs at least one seed factor vector")
    num_pairs = len(next(iter(seeds.values())))
    clean_seeds = {name: check_factors(list(v), num_pairs, name=f"seed {name}") for name, v in seeds.items()}
    max_factor = config.max_factor_ratio * float(extension_ratio)
    identity = _identity(config, clean_seeds, context or {})
    evaluations: list[dict] = []
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        state = read_json(path, advice="delete it to start the search afresh")
        if not isinstance(state, dict) or state.get("identity") != identity:
            raise SearchStateError(f"{path} holds another search (other seed, settings, model or target): delete it "
                                   "or choose another --out")
        evaluations = list(state["evaluations"])

    def save() -> None:
        if path is not None:
            atomic_write_json(path, {"format": STATE_FORMAT, "identity": identity, "config": asdict(config),
                                     "context": context or {}, "evaluations": evaluations})

    names = list(clean_seeds)
    known = {json.dumps(e["factors"]): e["fitness"] for e in evaluations}
    while len(evaluations) < config.budget:
        index = len(evaluations)
        if index < len(names):
            factors, origin = clean_seeds[names[index]], f"seed {names[index]}"
        else:
            factors, origin = propose(index, evaluations, config, max_factor)
        key = json.dumps(factors)
        value = known[key] if key in known else _finite(fitness(factors))
        known[key] = value
        record = {"index": index, "origin": origin, "factors": factors, "fitness": value}
        evaluations.append(record)
        save()
        if on_evaluation is not None:
            on_evaluation(record)
    seed_points = [e for e in evaluations if e["origin"].startswith("seed ")]
    ranked = _ranked(evaluations)
    best = ranked[0] if ranked else evaluations[0]
    seed_ranked = _ranked(seed_points)
    return {"best": best, "seed_best": seed_ranked[0] if seed_ranked else None, "evaluations": evaluations,
            "config": asdict(config)}

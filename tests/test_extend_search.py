"""The LongRoPE-style search: reproducible for a seed, valid factors, never worse than its best seed
point, and a killed search resumed from its state file ends exactly where an uninterrupted one does.
The fitness here is a cheap function with a known optimum, so the search itself is what is tested."""
import json
import math

import pytest

from posemb.lab.extend import methods as M
from posemb.lab.extend.search import SearchConfig, SearchStateError, propose, repair, run_search

GEOMETRY = M.RopeGeometry(base=10000.0, rotary_dim=16, trained_length=32)
TARGET = 256
RATIO = TARGET / 32
SEEDS = M.seed_factor_vectors(GEOMETRY, TARGET)
# an optimum between NTK and PI: no seed is it, so the search has something to find
OPTIMUM = [1.0 + (RATIO - 1.0) * (j / 7) ** 0.5 for j in range(8)]


def fitness(factors):
    return 1.0 + sum((math.log(f) - math.log(o)) ** 2 for f, o in zip(factors, OPTIMUM))


def test_reproducible_for_a_seed_and_different_across_seeds():
    config = SearchConfig(budget=20, seed=3)
    first = run_search(fitness, SEEDS, config, extension_ratio=RATIO)
    again = run_search(fitness, SEEDS, config, extension_ratio=RATIO)
    other = run_search(fitness, SEEDS, SearchConfig(budget=20, seed=4), extension_ratio=RATIO)
    assert first["evaluations"] == again["evaluations"]
    assert [e["factors"] for e in first["evaluations"][3:]] != [e["factors"] for e in other["evaluations"][3:]]


def test_factors_valid_and_best_never_worse_than_the_best_seed():
    result = run_search(fitness, SEEDS, SearchConfig(budget=40, seed=0), extension_ratio=RATIO)
    evaluations = result["evaluations"]
    assert len(evaluations) == 40
    assert [e["origin"] for e in evaluations[:3]] == ["seed linear", "seed ntk", "seed yarn"]
    for e in evaluations:
        assert M.check_factors(e["factors"], 8) == e["factors"]  # length 8, >= 1, non-decreasing
        assert max(e["factors"]) <= 2 * RATIO
        assert e["fitness"] == pytest.approx(fitness(e["factors"]))
    best_seed = min(fitness(v) for v in SEEDS.values())
    assert result["seed_best"]["fitness"] == pytest.approx(best_seed)
    assert result["best"]["fitness"] <= best_seed
    assert result["best"]["fitness"] == min(e["fitness"] for e in evaluations)
    # on this smooth problem the search must actually improve on its seeds
    assert result["best"]["fitness"] < best_seed


def test_killed_search_resumes_to_the_uninterrupted_result(tmp_path):
    config = SearchConfig(budget=15, seed=1)
    uninterrupted = run_search(fitness, SEEDS, config, extension_ratio=RATIO)
    state = tmp_path / "search.json"
    calls = {"n": 0}

    def dying(factors):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed during the 7th model evaluation
        return fitness(factors)

    with pytest.raises(KeyboardInterrupt):
        run_search(dying, SEEDS, config, extension_ratio=RATIO, state_path=state)
    saved = json.loads(state.read_text())
    assert len(saved["evaluations"]) == 6
    resumed = run_search(fitness, SEEDS, config, extension_ratio=RATIO, state_path=state)
    assert resumed["evaluations"] == uninterrupted["evaluations"]
    assert resumed["best"] == uninterrupted["best"]
    # a larger budget continues the same search
    longer = run_search(fitness, SEEDS, SearchConfig(budget=18, seed=1), extension_ratio=RATIO, state_path=state)
    assert longer["evaluations"][:15] == uninterrupted["evaluations"]
    assert len(longer["evaluations"]) == 18


def test_state_of_another_search_is_refused(tmp_path):
    state = tmp_path / "search.json"
    run_search(fitness, SEEDS, SearchConfig(budget=4, seed=0), extension_ratio=RATIO, state_path=state,
               context={"target": TARGET})
    with pytest.raises(SearchStateError, match="another search"):
        run_search(fitness, SEEDS, SearchConfig(budget=4, seed=1), extension_ratio=RATIO, state_path=state,
                   context={"target": TARGET})
    with pytest.raises(SearchStateError, match="another search"):
        run_search(fitness, SEEDS, SearchConfig(budget=4, seed=0), extension_ratio=RATIO, state_path=state,
                   context={"target": 2 * TARGET})


def test_non_finite_fitness_counts_as_worst():
    def sometimes_nan(factors):
        return math.nan if factors[-1] > RATIO else fitness(factors)

    result = run_search(sometimes_nan, SEEDS, SearchConfig(budget=25, seed=2), extension_ratio=RATIO)
    assert result["best"]["fitness"] is not None and math.isfinite(result["best"]["fitness"])


def test_repair_and_proposals_obey_the_constraints():
    assert repair([0.5, 3.0, 2.0, 9.0], max_factor=4.0) == [1.0, 3.0, 3.0, 4.0]
    evaluations = [{"index": i, "origin": "seed", "factors": v, "fitness": fitness(v)}
                   for i, v in enumerate(SEEDS.values())]
    for index in range(3, 30):
        child, origin = propose(index, evaluations, SearchConfig(), 2 * RATIO)
        assert M.check_factors(child, 8) == child and max(child) <= 2 * RATIO
        assert origin.startswith(("mutation", "crossover"))


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget"), ({"crossover_rate": 1.5}, "crossover_rate"), ({"max_factor_ratio": 0.5}, "max_factor"),
])
def test_bad_search_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_search(fitness, SEEDS, SearchConfig(**kwargs), extension_ratio=RATIO)

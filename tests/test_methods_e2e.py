"""Every method, with and without HAM, trains through the training app at 90% sparsity on synthetic
data, each at its own default distribution (ERK, uniform or one global threshold)."""

import json

import pytest

import sparseham.methods  # noqa: F401  (registers the built-in methods)
from sparseham.config import load_config
from sparseham.distributions import layer_counts
from sparseham.train.trainer import run

CONFIGS = {"dense": None, "random_pai": "erk", "snip": "global", "grasp": "global", "synflow": "global",
           "rigl": "erk", "set": "erk", "acdc": "global", "gmp": "uniform", "str": None}
SETS = ["data.dataset=synthetic", "model.name=lenet5", "data.batch_size=64", "train.max_steps=40",
        "logging.log_every=10", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0",
        "sparsity.rigl.update_every=10", "sparsity.set.update_every=10", "sparsity.gmp.every=5"]


@pytest.mark.parametrize("ham", [False, True], ids=["plain", "ham"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_trains_to_the_exact_budget_of_its_distribution(name, ham, tmp_path):
    cfg = load_config(f"configs/{name}.yaml", SETS + [f"ham.enabled={str(ham).lower()}"])
    assert run(cfg, tmp_path) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["ham"]["enabled"] is ham and final["steps"] == 40
    layers = final["layers"]
    if name == "dense":
        assert final["sparsity"] == 0.0
        return
    if name == "str":  # STR projects with one global threshold: global target within 1 point
        assert abs(final["sparsity"] - 0.9) <= 0.01
        return
    assert final["distribution"] == CONFIGS[name]
    kept = {n: round((1 - layer["sparsity"]) * layer["numel"]) for n, layer in layers.items()}
    total = sum(layer["numel"] for layer in layers.values())
    assert sum(kept.values()) == round(0.1 * total)
    if CONFIGS[name] == "global":  # one threshold: the layers' shares are not all equal
        assert len({round(k / layers[n]["numel"], 3) for n, k in kept.items()}) > 1
        return
    counts = layer_counts({n: layer["shape"] for n, layer in layers.items()}, 0.9, CONFIGS[name])
    assert kept == counts


@pytest.mark.parametrize("mode", ["free", "target"])
def test_str_modes_through_the_app(mode, tmp_path):
    sets = [*SETS, f"sparsity.str.mode={mode}", "sparsity.str.s_init=-4", "ham.enabled=true"]
    assert run(load_config("configs/str.yaml", sets), tmp_path) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    projection = final["method_summary"]["projection"]
    numel = sum(layer["numel"] for layer in final["layers"].values())
    zeros = sum(layer["sparsity"] * layer["numel"] for layer in final["layers"].values())
    assert final["sparsity"] == pytest.approx(zeros / numel)
    if mode == "free":  # the paper's STR: wherever the thresholds took it, no projection
        assert projection is None and 0.0 < final["sparsity"] < 0.9
        return
    assert final["sparsity"] == pytest.approx(0.9, abs=1e-3)
    kept = round(0.1 * numel)
    # The ramp ends at step 32 (project_at 0.8 of 40); the projection waits until close, by step 36.
    assert 32 <= projection["step"] <= 36 and projection["moved_fraction"] == projection["moved"] / kept
    assert set(projection["densities_before"]) == set(projection["densities_after"]) == set(final["layers"])
    # The projection keeps STR's allocation: each layer's kept count scales by the same factor, so
    # it moves exactly the weights the sparsity error demands.
    numels = {n: layer["numel"] for n, layer in final["layers"].items()}
    before = {n: round(d * numels[n]) for n, d in projection["densities_before"].items()}
    after = {n: round(d * numels[n]) for n, d in projection["densities_after"].items()}
    scale = kept / sum(before.values())
    assert all(abs(after[n] - before[n] * scale) <= 1 for n in numels)
    assert projection["moved"] == sum(abs(after[n] - before[n]) for n in numels)


@pytest.mark.parametrize(("total", "weights", "caps", "expected"), [
    (10, [1, 1, 1], [5, 5, 5], [4, 3, 3]),      # largest remainders, exact sum
    (10, [0, 0, 0], [2, 8, 10], [1, 4, 5]),     # nothing kept anywhere: by capacity
    (10, [9, 1, 0], [3, 100, 100], [3, 7, 0]),  # a full layer's excess goes to the others
    (0, [1], [4], [0]),
])
def test_str_allocation_split(total, weights, caps, expected):
    from sparseham.methods.str import allocate

    assert allocate(total, weights, caps) == expected

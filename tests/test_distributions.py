"""Per-layer densities: uniform, ER and ERK exactly as RigL defines them."""

import math

import pytest
import torch

from sparseham import global_topk_masks, layer_counts, layer_densities, topk_mask

LENET300 = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}
CONVNET = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 64)}


def _kept(shapes, dens):
    return sum(round(d * math.prod(shapes[n])) for n, d in dens.items())


@pytest.mark.parametrize("shapes", [LENET300, CONVNET])
@pytest.mark.parametrize("dist", ["uniform", "er", "erk"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.98])
def test_global_count_is_exact(shapes, dist, target):
    dens = layer_densities(shapes, target, dist)
    total = sum(math.prod(s) for s in shapes.values())
    assert _kept(shapes, dens) == round((1 - target) * total)
    assert all(0.0 <= d <= 1.0 for d in dens.values())


def test_erk_matches_hand_computation():
    # ERK raw scores: sum(shape)/prod(shape); eps solves sum(eps*raw*n) = budget. At 90% the
    # first solve gives fc3 a density of 1.84, so fc3 is dense and eps is re-solved over fc1, fc2.
    raw = {n: sum(s) / math.prod(s) for n, s in LENET300.items()}
    budget = round(0.1 * 266200) - 1000
    eps = budget / (raw["fc1"] * 235200 + raw["fc2"] * 30000)
    dens = layer_densities(LENET300, 0.9, "erk")
    assert dens["fc3"] == 1.0
    assert dens["fc1"] * 235200 == pytest.approx(eps * raw["fc1"] * 235200, abs=1.0)
    assert dens["fc2"] * 30000 == pytest.approx(eps * raw["fc2"] * 30000, abs=1.0)


def test_er_uses_only_fan_dims():
    shapes = {"a": (8, 4, 3, 3), "b": (16, 8, 3, 3)}
    dens = layer_densities(shapes, 0.8, "er")
    ratio = dens["a"] / dens["b"]
    assert ratio == pytest.approx(((8 + 4) / 32) / ((16 + 8) / 128), rel=1e-3)


def test_overfull_layers_become_dense_and_budget_is_resolved():
    # At 50% ERK the tiny last layer would exceed density 1: it is made dense, the rest re-solved.
    dens = layer_densities(LENET300, 0.5, "erk")
    assert dens["fc3"] == 1.0
    assert _kept(LENET300, dens) == 133100


def test_dense_layers_are_kept_dense():
    dens = layer_densities(CONVNET, 0.9, "uniform", dense=["conv1", "f*"])
    assert dens["conv1"] == 1.0 and dens["fc"] == 1.0
    assert dens["conv2"] == pytest.approx(dens["conv3"], abs=1e-3)
    assert _kept(CONVNET, dens) == round(0.1 * sum(math.prod(s) for s in CONVNET.values()))


def test_uniform_is_uniform():
    counts = layer_counts(LENET300, 0.9, "uniform")
    assert counts == {"fc1": 23520, "fc2": 3000, "fc3": 100}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"sparsity": 0.9, "distribution": "global"}, "no per-layer densities"),
        ({"sparsity": 0.9, "distribution": "erx"}, "unknown distribution 'erx'"),
        ({"sparsity": 0.99, "dense": ["fc1"]}, "dense layers alone hold more"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_densities(LENET300, **kwargs)


def test_topk_mask_exact_with_ties_and_deterministic():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, float("nan"), 3.0, 2.0])
    mask = topk_mask(scores, 3)
    assert mask.tolist() == [False, True, True, True, False, False, False, False]
    assert topk_mask(scores, 0).sum() == 0 and topk_mask(scores, 8).all()
    big = torch.randint(0, 5, (1000,)).float()
    for k in (1, 17, 500, 999):
        m = topk_mask(big, k)
        assert int(m.sum()) == k
        assert big[m].min() >= big[~m].max()


def test_global_topk_masks_one_threshold():
    a, b = torch.tensor([[5.0, 1.0], [2.0, 0.5]]), torch.tensor([4.0, 3.0, 0.1])
    ma, mb = global_topk_masks([a, b], 3)
    assert ma.tolist() == [[True, False], [False, False]] and mb.tolist() == [True, True, False]

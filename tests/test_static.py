"""Tests for methods/static.py and methods/scoring.py: pruning at initialization."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseham import MaskManager, layer_counts, methods
from sparseham.methods import scoring
from sparseham.models import build_model

Static = methods.get("static")
INITS = ("random", "magnitude", "snip", "grasp", "synflow")

# The hand-computed network: f(x) = W2 W1 x, one sample, squared error.
W1 = [[0.5, -1.0], [1.5, 0.25]]
W2 = [[-0.75, 2.0]]
X, Y = [[1.0, -2.0]], [[0.3]]


def _tiny() -> tuple[nn.Module, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Identity(), nn.Linear(2, 1, bias=False))
    model.double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[2].weight.copy_(torch.tensor(W2))
    batch = (torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64))
    return model, [model[0].weight, model[2].weight], [batch]


def _hand(temperature: float = 1.0):
    """g, Hg and the tensors they come from, by the chain rule written out for f = W2 W1 x."""
    w1, w2 = torch.tensor(W1, dtype=torch.float64), torch.tensor(W2, dtype=torch.float64)
    x, y = torch.tensor(X, dtype=torch.float64).T, torch.tensor(Y, dtype=torch.float64)
    t = temperature
    u = w1 @ x  # (2, 1)
    e = (w2 @ u) / t - y  # L = e^2
    g1, g2 = (2 * e / t) * w2.T @ x.T, (2 * e / t) * u.T
    # Hg = d/d(eps) grad L(theta + eps g) at eps = 0: f moves by df and u by g1 x.
    df = g2 @ w1 @ x + w2 @ g1 @ x
    h1 = (2 / t) * ((df / t) * w2.T @ x.T + e * g2.T @ x.T)
    h2 = (2 / t) * ((df / t) * u.T + e * (g1 @ x).T)
    return (w1, w2), (g1, g2), (h1, h2)


def _manager(model, method, data=None, **kwargs) -> MaskManager:
    return MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), method, data=data,
                       **kwargs)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 5))


def _mlp_data(n: int = 2) -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen))
            for _ in range(n)]


def _shapes(mm: MaskManager) -> dict:
    return {n: tuple(p.shape) for n, p in zip(mm.names, mm.params)}


# -- scores equal hand-computed values --------------------------------------------------------
def test_snip_equals_hand_computed():
    model, params, batches = _tiny()
    (w1, w2), (g1, g2), _ = _hand()
    s1, s2 = scoring.snip(model, params, batches, F.mse_loss)
    torch.testing.assert_close(s1, (g1 * w1).abs(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s2, (g2 * w2).abs(), rtol=1e-12, atol=0)


def test_grasp_equals_hand_computed_and_keeps_lowest():
    model, params, batches = _tiny()
    (w1, w2), _, (h1, h2) = _hand(temperature=2.0)
    s1, s2 = scoring.grasp(model, params, batches, F.mse_loss, temperature=2.0)
    torch.testing.assert_close(s1, -w1 * h1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s2, -w2 * h2, rtol=1e-12, atol=1e-15)
    # The paper removes the highest S: at 50% global the 3 lowest of the 6 scores stay.
    mm = _manager(model, Static(0.5, init="grasp", distribution="global", grasp_temperature=2.0),
                  batches, loss_fn=F.mse_loss)
    flat = torch.cat([(-w1 * h1).flatten(), (-w2 * h2).flatten()])
    kept = torch.cat([m.flatten() for m in mm.masks])
    assert kept.sum() == 3 and flat[kept].max() < flat[~kept].min()


def test_synflow_equals_hand_computed():
    model, params, _ = _tiny()
    a1, a2 = torch.tensor(W1).double().abs(), torch.tensor(W2).double().abs()
    # R = sum_j |W2_j| sum_i |W1_ji|, so dR/d|W1_ji| = |W2_j| and dR/d|W2_j| = sum_i |W1_ji|.
    r1, r2 = a1 * a2.T, a2 * a1.sum(1)
    top = torch.cat([r1.flatten(), r2.flatten()]).max()
    s1, s2 = scoring.synflow(model, params, [2])
    torch.testing.assert_close(s1, r1 / top, rtol=1e-12, atol=0)
    torch.testing.assert_close(s2, r2 / top, rtol=1e-12, atol=0)


def test_snip_sums_the_requested_batches():
    model, params, _ = _tiny()
    data = [(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64))
            for _ in range(4)]
    w = [p.detach() for p in params]
    grads = [torch.zeros_like(p) for p in params]
    for x, y in data[:2]:
        grads = [a + b for a, b in zip(grads, torch.autograd.grad(F.mse_loss(model(x), y), params))]
    read = []
    mm = _manager(model, Static(0.5, init="snip", distribution="global", batches=2),
                  (read.append(b) or b for b in data), loss_fn=F.mse_loss)
    assert len(read) == 2
    flat = torch.cat([(g * p).abs().flatten() for g, p in zip(grads, w)])
    kept = torch.cat([m.flatten() for m in mm.masks])
    assert flat[kept].min() > flat[~kept].max()


# -- exact counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("init", INITS)
def test_exact_layer_counts(init, distribution):
    torch.manual_seed(0)
    model = _mlp()
    method = Static(0.8, init=init, distribution=distribution, dense_layers=["4.*"],
                    synflow_rounds=10)
    mm = _manager(model, method, _mlp_data())
    want = layer_counts(_shapes(mm), 0.8, distribution, ["4.*"])
    assert [int(m.sum()) for m in mm.masks] == [want[n] for n in mm.names] == mm.expected
    assert mm.masks[2].all()
    mm.verify()


@pytest.mark.parametrize("init", ["magnitude", "snip", "grasp", "synflow"])
def test_exact_global_count_with_dense_layer(init):
    torch.manual_seed(0)
    model = _mlp()
    method = Static(0.8, init=init, distribution="global", dense_layers=["4.weight"],
                    synflow_rounds=10)
    mm = _manager(model, method, _mlp_data())
    total = sum(p.numel() for p in mm.params)
    assert sum(int(m.sum()) for m in mm.masks) == round(0.2 * total) == mm.expected
    assert mm.masks[2].all()
    mm.verify()


@pytest.mark.parametrize("distribution", ["erk", "global"])
def test_magnitude_keeps_largest(distribution):
    torch.manual_seed(0)
    model = _mlp()
    w = [p.detach().abs().clone() for p in (model[0].weight, model[2].weight, model[4].weight)]
    mm = _manager(model, Static(0.7, init="magnitude", distribution=distribution))
    pairs = list(zip(w, mm.masks))
    if distribution == "global":
        pairs = [(torch.cat([a.flatten() for a in w]), torch.cat([m.flatten() for m in mm.masks]))]
    for a, m in pairs:
        assert a[m].min() >= a[~m].max()


def test_random_is_seeded_and_deterministic():
    def masks(**kw):
        torch.manual_seed(3)
        return _manager(_mlp(), Static(0.5, init="random", distribution="uniform", **kw)).masks

    assert all(torch.equal(a, b) for a, b in zip(masks(), masks()))
    assert all(torch.equal(a, b) for a, b in zip(masks(seed=7), masks(seed=7)))
    assert not all(torch.equal(a, b) for a, b in zip(masks(seed=7), masks(seed=8)))


def test_synflow_resnet20_98_keeps_every_layer():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]  # SynFlow takes its input shape
    mm = _manager(copy.deepcopy(model), Static(0.98, init="synflow", distribution="global"), data)
    kept = [int(m.sum()) for m in mm.masks]
    assert min(kept) > 0, dict(zip(mm.names, kept))
    assert sum(kept) == round(0.02 * sum(p.numel() for p in mm.params))
    # One shot (a single round) empties layers here: the 100 rounds are what prevents it.
    one = _manager(model, Static(0.98, init="synflow", distribution="global", synflow_rounds=1),
                   data)
    assert min(int(m.sum()) for m in one.masks) == 0


def test_synflow_scores_resnet56_without_overflow():
    # R is about 5e69 here: float32 gives inf. Every layer must get finite, non-zero scores.
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10, in_channels=3, image_size=32)
    params = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    scores = scoring.synflow(model, params, [3, 32, 32])
    assert all(torch.isfinite(s).all() and s.max() > 0 for s in scores)


# -- the model is left as it was ----------------------------------------------------------------
def _bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("init", INITS)
def test_setup_leaves_model_and_rng_untouched(init, device):
    torch.manual_seed(0)
    model = _bn_net().train().to(device)
    model[1].running_mean.uniform_(-1, 1)
    model[1].weight.requires_grad_(False)
    model[5].weight.grad = torch.randn_like(model[5].weight)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))),
        batch_size=4, shuffle=True)  # iterating draws from the global RNG
    before, rng = _snapshot(model), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    mm = _manager(model, Static(0.5, init=init, synflow_rounds=3), data)
    after = _snapshot(model)
    assert torch.equal(torch.get_rng_state(), rng)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
    assert after["modes"] == before["modes"] and after["flags"] == before["flags"]
    assert after["grads"][0] is None and torch.equal(after["grads"][4], before["grads"][4])
    assert all(m.device == p.device for m, p in zip(mm.masks, mm.params))
    mm.verify()
    masked = {n: m for n, m in zip(mm.names, mm.masks)}
    for key, value in before["state"].items():
        want = value * masked[key] if key in masked else value
        assert torch.equal(after["state"][key], want), key


@pytest.mark.parametrize("score", ["snip", "grasp", "synflow"])
def test_scoring_functions_leave_model_bitwise(score):
    torch.manual_seed(0)
    model = _bn_net().train()
    params = [model[0].weight, model[5].weight]
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,)))]
    before = _snapshot(model)
    if score == "synflow":
        scoring.synflow(model, params, [1, 8, 8], rounds=2, prune=lambda s, f: s)
    else:
        getattr(scoring, score)(model, params, batches, F.cross_entropy)
    after = _snapshot(model)
    assert after["modes"] == before["modes"] and after["flags"] == before["flags"]
    assert after["grads"] == before["grads"] == [None] * len(before["grads"])
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


# -- dead units -----------------------------------------------------------------------------------
def test_remove_dead_leaves_no_dead_unit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(),
                          nn.Linear(30, 10))
    plain = _manager(copy.deepcopy(model), Static(0.99, distribution="uniform")).masks
    mm = _manager(model, Static(0.99, distribution="uniform", remove_dead=True))
    assert not all(torch.equal(a.any(1), b.any(0)) for a, b in zip(plain, plain[1:]))
    for a, b in zip(mm.masks, mm.masks[1:]):  # a unit has inputs exactly when it has outputs
        assert torch.equal(a.any(1), b.any(0))
    assert all(not (m & ~p).any() for m, p in zip(mm.masks, plain))
    assert sum(int(m.sum()) for m in mm.masks) < sum(int(m.sum()) for m in plain)
    assert mm.expected == [int(m.sum()) for m in mm.masks] and mm.sparsity() > 0.99
    mm.verify()


def test_chained_pairs_stop_at_spatial_flatten():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 6, 3)),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 3), nn.Linear(3, 2))
    params = [model[0].weight, model[2][0].weight, model[4].weight, model[5].weight]
    assert scoring.chained_pairs(model, params) == [(0, 1), (2, 3)]


# -- options and errors -----------------------------------------------------------------------
def test_registry_and_options_help():
    assert Static.inits == (*INITS, "existing", "wanda", "sparsegpt")
    assert Static.distributions == ("uniform", "er", "erk", "global")
    assert Static.masking is True
    assert all(f.metadata.get("help") for f in dataclasses.fields(Static.Options))


@pytest.mark.parametrize(("options", "match"), [
    ({"batches": 0}, r"batches must be an integer >= 1, got 0"),
    ({"synflow_rounds": 2.5}, r"synflow_rounds must be an integer >= 1, got 2.5"),
    ({"grasp_temperature": 0.0}, r"grasp_temperature must be a finite number > 0, got 0.0"),
    ({"grasp_temperature": math.inf}, r"grasp_temperature must be a finite number > 0, got inf"),
    ({"remove_dead": "yes"}, r"remove_dead must be true or false, got 'yes'"),
    ({"input_shape": [3, 0]}, r"input_shape must be a non-empty list of integers >= 1"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"init": "snipp"}, r"unknown init 'snipp'; did you mean 'snip'\?"),
    ({"init": "random", "distribution": "global"}, r"'random' with distribution 'global'"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        Static(0.5, **options)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("kwargs", "data", "match"), [
    ({"init": "snip"}, None, r"init 'snip' scores with data; pass MaskManager\(\.\.\., data="),
    ({"init": "grasp"}, [], r"init 'grasp' got no batch from MaskManager data"),
    ({"init": "synflow"}, None, r"init 'synflow' needs the input shape; set the option"),
    ({"init": "magnitude", "distribution": "global", "dense_layers": ["0.*"]}, None,
     r"dense layers alone hold more than 0\.01 of the weights"),
    ({"init": "magnitude", "remove_dead": True}, None,
     r"remove_dead needs a plain nn.Sequential model \(layers applied in order\); 'model' is a "
     r"_Branchy; set remove_dead=False"),
])
def test_setup_errors(kwargs, data, match):
    target = 0.99 if "dense_layers" in kwargs else 0.5
    model = _Branchy() if kwargs.get("remove_dead") else _mlp()
    with pytest.raises(ValueError, match=match):
        _manager(model, Static(target, **kwargs), data)

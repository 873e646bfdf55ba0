"""The contract every registered method keeps, composed with HAM, plus method-specific checks."""

import copy
import math

import pytest
import torch
from torch import nn

from sparseham import HAM, MaskManager, SignFlipTracker, methods
from sparseham.schedules import acdc_phases, cosine_drop_fraction, phase_at

TOTAL = 40
KWARGS = {
    "dense": {},
    "static": {"target": 0.9, "init": "snip"},
    "rigl": {"target": 0.9, "update_every": 4},
    "set": {"target": 0.9, "update_every": 4},
    "acdc": {"target": 0.9, "warmup": 4, "phase": 6, "final": 10, "unit": "steps"},
    "gmp": {"target": 0.9, "start": 4, "end": 24, "every": 5, "unit": "steps"},
    "str": {"target": 0.9, "s_init": -3.0, "project_at": 0.5},
    "magnitude": {"target": 0.9},
    "wanda": {"target": 0.9},
    "sparsegpt": {"target": 0.9},
}


def test_every_registered_method_is_covered():
    assert set(methods.available()) == set(KWARGS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _build(name, opt_name="sgd", **overrides):
    torch.manual_seed(0)
    model = Net()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[opt_name]
    opt = HAM(make(model.parameters()), alpha=20.0, beta=1e-2)
    method = methods.get(name)(**{**KWARGS[name], **overrides})
    mm = MaskManager(model, opt, method, tracker=SignFlipTracker(), total_steps=TOTAL, steps_per_epoch=10,
                     data=[_batch(-1)])
    return model, opt, mm


def _step(model, opt, mm, step):
    x, y = _batch(step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    mm.step()


def _check_invariants(mm, opt):
    mm.verify()  # exact per-layer (or global) counts and no leaked weight
    if not (mm.masks is not None and mm.method.masking):
        return
    for p, m in zip(mm.params, mm.masks):
        assert torch.all(p[~m] == 0)
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert torch.all(value[~m] == 0)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(KWARGS))
def test_invariants_after_every_step(name, opt_name):
    model, opt, mm = _build(name, opt_name)
    _check_invariants(mm, opt)
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        _check_invariants(mm, opt)
    mm.method.finalize(mm)
    _check_invariants(mm, opt)
    if name != "dense":
        assert mm.sparsity() == pytest.approx(0.9, abs=1.5 / sum(p.numel() for p in mm.params))


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_ham_never_revives_a_zero(name):
    model, opt, mm = _build(name)
    # The optimizer is stepped directly, outside the pipeline, on purpose: the manager says so once.
    with pytest.warns(UserWarning, match="stepped outside MaskManager.step") as said:
        for step in range(TOTAL // 2):
            zeros = [p.detach() == 0 for p in mm.params]
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for p, z in zip(mm.params, zeros):
                p.grad[z] = 0.0  # with no gradient, only the mirror step could move a zero
            opt.step()
            assert all(torch.all(p[z] == 0) for p, z in zip(mm.params, zeros))
    assert len(said) == 1


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_state_dict_round_trip_mid_training_is_bit_identical(name):
    model, opt, mm = _build(name)
    for step in range(TOTAL // 2 + 3):
        _step(model, opt, mm, step)
    saved = copy.deepcopy((mm.state_dict(), model.state_dict(), opt.state_dict()))
    for step in range(TOTAL // 2 + 3, TOTAL):
        _step(model, opt, mm, step)
    model2, opt2, mm2 = _build(name)
    mm2.load_state_dict(saved[0])  # first: STR may have reshaped the model
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    for step in range(TOTAL // 2 + 3, TOTAL):
        _step(model2, opt2, mm2, step)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert mm.tracker.read() == mm2.tracker.read()


# -- RigL ---------------------------------------------------------------------------------------


def test_rigl_drop_fraction_schedule_values():
    assert cosine_drop_fraction(0, 1000, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(250, 1000, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(500, 1000, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(1000, 1000, 0.3) == 0.0


@pytest.mark.parametrize("name", ["rigl", "set"])
def test_rigl_drop_and_grow_disjoint_and_grown_start_at_zero(name):
    model, opt, mm = _build(name, reference=False)
    rigl = mm.method
    for step in range(1, 4):
        _step(model, opt, mm, step)
    before = [m.clone() for m in mm.masks]
    x, y = _batch(4)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dense = [p.grad.abs().clone() for p in mm.params]
    mm.step()  # step 4 is an update step
    f = cosine_drop_fraction(4, 30, 0.3)
    for p, g, old, new, k in zip(mm.params, dense, before, mm.masks, rigl.counts):
        dropped, grown = old & ~new, new & ~old
        d = min(math.floor(f * k), p.numel() - k)
        assert int(dropped.sum()) == int(grown.sum()) == d > 0
        assert not torch.any(dropped & grown)
        assert int(new.sum()) == k
        assert torch.all(p[grown] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][grown] == 0)
        if name == "rigl":  # grown: the largest dense gradients among the weights inactive before
            assert g[grown].min() >= g[~old & ~grown].max()


def test_rigl_stops_at_end():
    model, opt, mm = _build("rigl", reference=False)
    changed = []
    for step in range(TOTAL):
        old = [m.clone() for m in mm.masks]
        _step(model, opt, mm, step)
        if any(not torch.equal(a, b) for a, b in zip(old, mm.masks)):
            changed.append(mm.step_count)
    assert changed == [4, 8, 12, 16, 20, 24, 28]  # every 4 steps, none at or after end = 30


# A hand-built layer: 8 weights, 4 active (flat 0, 1, 2, 7), lr 0 so a step does not move them.
W = torch.tensor([[0.9, -0.1, 0.5, 0.0], [0.0, 0.0, 0.0, -0.7]])
G = torch.tensor([[0.1, 0.2, 0.85, 0.9], [0.05, 0.8, 0.4, 0.6]])
ACTIVE = torch.tensor([[True, True, True, False], [False, False, False, True]])


def _hand_layer(reference: bool, lr: float = 0.0):
    layer = nn.Linear(4, 2, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    rigl = methods.get("rigl")(0.5, update_every=10, end=1.0, drop_fraction=0.6, reference=reference)
    mm = MaskManager(layer, opt, rigl, total_steps=100)
    with torch.no_grad():
        layer.weight.copy_(W)
    mm.set_masks([ACTIVE], expected=[4])
    opt.state[layer.weight]["momentum_buffer"] = torch.ones(2, 4) * ACTIVE
    layer.weight.grad = G.clone()
    return layer, opt, mm


def _flat(mask):
    return sorted(torch.nonzero(mask.view(-1)).view(-1).tolist())


def test_rigl_reference_update_on_a_hand_built_layer():
    # google-research/rigl _get_update_op at global step 0: drop fraction 0.6 -> d = int(4 * 0.6) = 2.
    # Keep the 2 largest |w| of the active (0.9 at 0, -0.7 at 7); grow the 2 largest |g| among all
    # others, the just-dropped included: 0.9 at 3 and 0.85 at 2 (just dropped, regrows).
    layer, opt, mm = _hand_layer(reference=True, lr=0.1)
    mm.step()
    assert _flat(mm.masks[0]) == [0, 2, 3, 7]
    assert mm.step_count == 0  # a topology-only iteration: no optimizer step
    w = layer.weight.detach().view(-1)
    assert w.tolist() == pytest.approx([0.9, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -0.7])  # 2 keeps its value
    momentum = opt.state[layer.weight]["momentum_buffer"].view(-1)
    assert momentum.tolist() == [1, 0, 1, 0, 0, 0, 0, 1]  # new connection 3 starts at 0; 2 keeps its own
    layer.weight.grad = G.clone()
    mm.step()  # the next iteration is the gradient step
    assert mm.step_count == 1 and layer.weight.detach().view(-1)[0] != 0.9


def test_rigl_disjoint_update_on_the_same_layer():
    # reference: false, at step 10 (f = 0.3 (1 + cos(pi / 10)) = 0.585 -> d = 2): drop the 2 smallest
    # |w| of the active (-0.1 at 1, 0.5 at 2), grow the 2 largest |g| among those inactive before
    # (0.9 at 3, 0.8 at 5): the just-dropped 2 cannot regrow.
    layer, opt, mm = _hand_layer(reference=False)
    mm.step_count = 9
    mm.step()
    assert mm.step_count == 10 and _flat(mm.masks[0]) == [0, 3, 5, 7]
    assert layer.weight.detach().view(-1).tolist() == pytest.approx([0.9, 0, 0, 0, 0, 0, 0, -0.7])


# -- AC/DC --------------------------------------------------------------------------------------


def _phase_list(phases):
    return [(p.start, p.end, "S" if p.sparse else "D") for p in phases]


def test_acdc_timeline_is_the_authors_imagenet_list():
    # IST-DASLab/ACDC configs/neurips/iht_imagenet_resnet50_insta_cosinelr_s90_ep100.yaml: pruners
    # [10, 10, 71] and [85, 20, 100], recyclers [15, 10, 66] and [75, 20, 86] ([start, freq, end]).
    expected = [(0, 10, "D")]
    for start in range(10, 75, 10):
        expected += [(start, start + 5, "S"), (start + 5, start + 10, "D")] if start < 70 else [(70, 75, "S")]
    expected += [(75, 85, "D"), (85, 100, "S")]
    assert _phase_list(acdc_phases(100, warmup=10, phase=5, final=15)) == expected
    # The 150-epoch config: prunes at 10, 20, ..., 120 and 135; restores at 15, ..., 115 and 125.
    ep150 = _phase_list(acdc_phases(150, warmup=10, phase=5, final=15))
    assert [p[0] for p in ep150 if p[2] == "S"] == [*range(10, 121, 10), 135]
    assert [p[0] for p in ep150 if p[2] == "D"] == [0, *range(15, 116, 10), 125]
    assert ep150[-2:] == [(125, 135, "D"), (135, 150, "S")]
    ep100 = acdc_phases(100, 10, 5, 15)
    assert phase_at(ep100, 99).sparse and not phase_at(ep100, 80).sparse


def test_acdc_timeline_is_the_authors_cifar_list():
    # iht_cifar10_resnet20_unstructured_insta_prune_freq20_90_constant.yaml: pruner [10, 40, 171],
    # recycler [30, 40, 151], 200 epochs.
    assert _phase_list(acdc_phases(200, warmup=10, phase=20, final=30)) == [
        (0, 10, "D"), (10, 30, "S"), (30, 50, "D"), (50, 70, "S"), (70, 90, "D"), (90, 110, "S"),
        (110, 130, "D"), (130, 150, "S"), (150, 170, "D"), (170, 200, "S")]


def test_acdc_runs_the_timeline_step_by_step():
    model, opt, mm = _build("acdc")
    phases = mm.method.phases
    for step in range(TOTAL):
        expect_sparse = phase_at(phases, step).sparse
        assert (mm.masks is not None) == expect_sparse, f"step {step}"
        _step(model, opt, mm, step)
    assert mm.masks is not None and mm.phase == "compressed"


def _acdc_with_snapshots(**overrides):
    """An AC/DC run that records, at every compression, the weights it compressed and the masks."""
    model, opt, mm = _build("acdc", **overrides)
    seen = []
    original = mm.set_masks

    def set_masks(masks, expected=None, reference=None):
        seen.append(([p.detach().clone() for p in mm.params], [m.clone() for m in masks]))
        original(masks, expected=expected, reference=reference)

    mm.set_masks = set_masks
    return model, opt, mm, seen


def test_acdc_compresses_with_one_global_threshold():
    model, opt, mm, seen = _acdc_with_snapshots()
    assert mm.method.distribution == "global"  # AC/DC's default, as in the paper
    for step in range(TOTAL):
        _step(model, opt, mm, step)
    assert len(seen) >= 2
    total = sum(p.numel() for p in mm.params)
    for weights, masks in seen:
        # By hand: keep the round(0.1 * N) largest |w| over all layers together.
        flat = torch.cat([w.abs().view(-1) for w in weights])
        k = round(0.1 * total)
        threshold = torch.topk(flat, k).values.min()
        kept = torch.cat([m.view(-1) for m in masks])
        assert int(kept.sum()) == k
        assert flat[kept].min() >= threshold and flat[~kept].max() <= threshold
    densities = [float(m.float().mean()) for m in seen[-1][1]]
    assert max(densities) - min(densities) > 0.05  # one threshold: the layers' densities differ


def test_acdc_churn_is_the_hamming_distance_between_compressed_masks():
    model, opt, mm, seen = _acdc_with_snapshots()
    g = torch.Generator().manual_seed(7)
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        if mm.masks is None:  # decompressed: shuffle the magnitudes, so the next mask must differ
            with torch.no_grad():
                for p in mm.params:
                    p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    churns = [e["churn"] for e in mm.mask_events if e["phase"] == "compressed"]
    assert churns[0] is None  # the first compression has nothing to compare with
    for (_, before), (_, after), churn in zip(seen, seen[1:], churns[1:]):
        by_hand = [int((a != b).sum()) for a, b in zip(before, after)]
        assert churn.tolist() == by_hand and sum(by_hand) > 0


def test_acdc_tracks_flips_by_the_last_compressed_mask_in_dense_phases():
    model, opt, mm, seen = _acdc_with_snapshots()
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        if mm.masks is None and seen:  # decompressed after a compression
            tracked = mm.method.tracking_masks(mm)
            assert all(torch.equal(t, m) for t, m in zip(tracked, seen[-1][1]))


@pytest.mark.parametrize("reset", ["decompression", "none"])
def test_acdc_resets_all_optimizer_state_at_decompression(reset):
    model, opt, mm = _build("acdc", reset_state=reset)
    phases = mm.method.phases
    decompress = [p.start for p in phases if not p.sparse and p.start > 0]
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        if mm.step_count in decompress:
            buffers = [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]]
            zero = [bool(torch.all(b == 0)) for b in buffers]
            # every parameter the optimizer holds, biases included (the authors' reset), or none
            assert all(zero) if reset == "decompression" else not any(zero), (step, zero)


# -- STR ----------------------------------------------------------------------------------------


def test_str_forward_is_soft_threshold_and_tracks_implicit_mask():
    model, opt, mm = _build("str")
    conv = model.conv
    latent = conv.parametrizations.weight.original
    tau = torch.sigmoid(conv.parametrizations.weight[0].s)
    expected = torch.sign(latent) * torch.relu(latent.abs() - tau)
    assert torch.equal(conv.weight, expected)
    assert torch.equal(mm.method.tracking_masks(mm)[0], latent.abs() > tau)


def test_str_target_mode_lands_on_target():
    model, opt, mm = _build("str")
    for step in range(TOTAL):
        _step(model, opt, mm, step)
    mm.method.finalize(mm)
    assert abs(mm.sparsity() - 0.9) <= 0.01
    assert all(torch.equal(p != 0, m) for p, m in zip(mm.params, mm.masks))
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_str_threshold_shift_keeps_exactly_the_target_count_with_one_common_offset():
    model, opt, mm = _build("str")
    method = mm.method
    ss = [m.parametrizations.weight[0].s for m in method.modules]
    before = [float(s.detach()) for s in ss]
    n = sum(p.numel() for p in mm.params)
    for aim in (0.9, 0.5, 0.97):
        method._shift(mm, 7, aim)
        assert sum(int(m.sum()) for m in method._implicit_masks()) == round((1 - aim) * n)
    offsets = [float(s.detach()) - b for s, b in zip(ss, before)]
    assert max(offsets) - min(offsets) < 1e-6  # every layer's threshold moved alike
    assert method.shifted_at == 7 and method.shifts == 3


def test_str_target_mode_freezes_the_thresholds_and_projects_a_small_correction():
    model, opt, mm = _build("str", control_every=2)
    method = mm.method
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        if method.frozen and not method.projected:  # the window: a shift sticks until it projects
            s = [m.parametrizations.weight[0].s for m in method.modules]
            assert all(not t.requires_grad and t.grad is None for t in s)
    p = method.projection
    assert p is not None and p["threshold_shifts"] >= 1
    assert p["moved_fraction"] <= 0.01 and abs(p["sparsity_before"] - 0.9) <= 0.001
    assert abs(mm.sparsity() - 0.9) < 1e-3


def test_str_window_state_survives_a_checkpoint():
    model, opt, mm = _build("str", control_every=2)
    for step in range(21):  # the window opens at step 20: thresholds frozen, one shift
        _step(model, opt, mm, step)
    assert mm.method.frozen and not mm.method.projected
    state = mm.method.state_dict()
    _, _, fresh = _build("str", control_every=2)
    fresh.method.load_state_dict(state)
    assert fresh.method.frozen and (fresh.method.shifted_at, fresh.method.shifts) == (20, 1)
    assert not any(m.parametrizations.weight[0].s.requires_grad for m in fresh.method.modules)


def test_method_option_errors():
    with pytest.raises(TypeError, match="rigl: unknown option 'update_evry'; did you mean 'update_every'"):
        methods.get("rigl")(target=0.9, update_evry=3)
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\), got 1.5"):
        methods.get("rigl")(target=1.5)
    with pytest.raises(ValueError, match="dense: target must be 0"):
        methods.get("dense")(target=0.5)
    with pytest.raises(ValueError, match="mode must be target or free"):
        methods.get("str")(target=0.9, mode="exact")
    model = Net()
    with pytest.raises(ValueError, match="rigl: needs the length of training"):
        MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), methods.get("rigl")(target=0.9))


def test_str_initial_sparsity_at_s_init():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    latent = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    numel = sum(w.numel() for w in latent)
    # By hand: the fraction of weights with |w| <= sigmoid(-5) = 0.00669.
    expected = sum(int((w.abs() <= 1 / (1 + math.exp(5.0))).sum()) for w in latent) / numel
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    ours = MaskManager(model, opt, methods.get("str")(0.9, s_init=-5.0, mode="free"))
    assert 0.15 < expected < 0.22 and ours.sparsity() == pytest.approx(expected, abs=1e-6)
    model = torchvision.models.resnet50()
    reference = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            methods.get("str")(0.9, mode="free"))  # s_init -3200: sigmoid(s) = 0
    assert reference.method.s_init == -3200.0 and reference.sparsity() == 0.0


def _hand_str(ham_threshold: bool, s_weight_decay=None):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    w0 = layer.weight.detach().clone()
    opt = HAM(torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.01), alpha=2.0, beta=0.1, clamp=5.0)
    str_ = methods.get("str")(0.5, s_init=-2.0, mode="free", ham_threshold=ham_threshold,
                              s_weight_decay=s_weight_decay)
    mm = MaskManager(layer, opt, str_)
    return layer, opt, mm, w0


@pytest.mark.parametrize("ham_threshold", [True, False])
def test_str_matches_a_hand_rolled_loop_with_threshold_decay_and_ham(ham_threshold):
    layer, opt, mm, w = _hand_str(ham_threshold)
    s = torch.full((1, 1), -2.0)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        # By hand: the loss through sign(w) relu(|w| - sigmoid(s)); SGD with weight decay 0.01 on
        # w and s (the reference: s gets the weights' decay), then HAM's mirror step on w and,
        # when ham_threshold, on s (shape (1, 1): the authors' wrapper mirrors it).
        wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
        (torch.sign(wr) * torch.relu(wr.abs() - torch.sigmoid(sr)) @ x.T).square().mean().backward()
        for t, g, mirror in ((w, wr.grad, True), (s, sr.grad, ham_threshold)):
            half = t - 0.1 * (g + 0.01 * t)
            if mirror:
                half = half * torch.exp(torch.clamp(-0.1 * (2.0 * torch.sign(half) * g + 0.1), -5, 5))
            t.copy_(half)
        layer(x).square().mean().backward()
        mm.step()
        opt.zero_grad()
    threshold = layer.parametrizations.weight[0].s.detach()
    assert torch.allclose(threshold, s, atol=1e-6) and torch.allclose(mm.params[0].detach(), w, atol=1e-6)


def test_str_threshold_decay_drives_sparsity():
    sparsity = []
    for decay in (0.0, 0.5):
        layer, opt, mm, _ = _hand_str(False, s_weight_decay=decay)
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
        for _ in range(60):
            (layer(x) - x[:, :4]).square().mean().backward()
            mm.step()
            opt.zero_grad()
        sparsity.append(mm.sparsity())
    assert sparsity[1] > sparsity[0] + 0.1


# -- GMP ----------------------------------------------------------------------------------------


def test_gmp_follows_the_cubic_schedule_to_the_weight():
    model, opt, mm = _build("gmp")
    numel = {n: p.numel() for n, p in zip(mm.names, mm.params)}
    assert mm.masks is None  # dense until the first pruning step
    previous = None
    for step in range(TOTAL):
        _step(model, opt, mm, step)
        t = mm.step_count
        # Zhu & Gupta Eq. (1) with s_i = 0, s_f = 0.9, t_0 = 4, t_end = 24, computed here by hand.
        done = [u for u in (9, 14, 19, 24) if u <= t]
        if not done:
            assert mm.masks is None, t
            continue
        s = 0.9 - 0.9 * (1 - (done[-1] - 4) / 20) ** 3
        # uniform: each layer keeps round((1 - s) * n) up to the largest-remainder split of the total
        kept = dict(zip(mm.names, mm.kept().tolist()))
        assert sum(kept.values()) == round((1 - s) * sum(numel.values())), t
        assert all(abs(kept[n] - (1 - s) * numel[n]) <= 1 for n in numel), t
        if previous is not None:  # pruned weights never come back
            assert all(not torch.any(m & ~p) for m, p in zip(mm.masks, previous))
        previous = [m.clone() for m in mm.masks]
    assert mm.sparsity() == pytest.approx(0.9, abs=1 / sum(numel.values()))


def test_gmp_schedule_values():
    gmp = methods.get("gmp")(0.8, start=0, end=10, every=1, unit="steps")
    gmp.start, gmp.end = 0, 10
    expected = [0.0, round(0.8 - 0.8 * 0.5**3, 6), 0.8, 0.8]
    assert [round(gmp.sparsity_at(t), 6) for t in (0, 5, 10, 12)] == expected

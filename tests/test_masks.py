"""MaskManager: selection, the pipeline order, and the masking invariants."""

import copy

import pytest
import torch
from torch import nn

from sparseham import HAM, MaskInvariantError, MaskManager, Method, SignFlipTracker, layer_counts, topk_mask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class Swapper(Method):
    """A tiny test method: random ERK masks, and every 2nd step it swaps 2 weights per layer."""

    def setup(self, manager):
        g = torch.Generator().manual_seed(0)
        shapes = {n: tuple(p.shape) for n, p in zip(manager.names, manager.params)}
        self.counts = list(layer_counts(shapes, self.target, "erk").values())
        masks = [topk_mask(torch.rand(p.shape, generator=g), k) for p, k in zip(manager.params, self.counts)]
        manager.set_masks(masks, expected=self.counts)

    def post_step(self, manager):
        if manager.step_count % 2:
            return
        new, grown = [], []
        g = torch.Generator().manual_seed(manager.step_count)  # resumable: no global RNG
        for p, m in zip(manager.params, manager.masks):
            keep = topk_mask(torch.where(m, p.detach().abs(), -1.0), int(m.sum()) - 2)
            grow = topk_mask(torch.where(m, -1.0, torch.rand(p.shape, generator=g)), 2)
            new.append(keep | grow)
            grown.append(grow)
        manager.zero_state_(grown)
        manager.set_masks(new, expected=self.counts)


def _setup(opt_name="sgd", tracker=None, fused=None):
    torch.manual_seed(0)
    model = Net()
    base = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    }[opt_name](model.parameters())
    opt = HAM(base, alpha=20.0, beta=1e-2, fused=fused)
    return model, opt, MaskManager(model, opt, Swapper(0.8), tracker=tracker)


def _train_step(model, opt, mm, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    mm.step()


def test_selects_conv_and_linear_weights_only():
    model = Net()
    mm = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), Swapper(0.5))
    assert mm.names == ["conv.weight", "fc1.weight", "fc2.weight"]
    mm2 = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), Swapper(0.5), exclude=["fc2.*"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert MaskManager(model, opt, Swapper(0.5), None, None, None).names  # None means the defaults
    assert mm2.names == ["conv.weight", "fc1.weight"]
    mm3 = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), Swapper(0.5), include=["*.bias"])
    assert mm3.names == ["conv.bias", "bn.bias", "fc1.bias", "fc2.bias"]
    with pytest.raises(ValueError, match="found no parameters to manage"):
        MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), Swapper(0.5), include=["nope"])


@pytest.mark.parametrize("fused", [None, False], ids=["one_pass", "staged"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_invariants_hold_after_every_step(opt_name, fused):
    model, opt, mm = _setup(opt_name, fused=fused)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = [p.grad.clone() for p in mm.params]
        masks_used = [m.clone() for m in mm.masks]  # a topology change after the step replaces them
        mm.step()
        # The staged pipeline masks .grad in place; the one-pass step masks it in registers only
        # and leaves .grad as the backward pass wrote it.
        for p, r, m in zip(mm.params, raw, masks_used):
            assert torch.equal(p.grad, r if fused is None else r * m)
        for p, m, k in zip(mm.params, mm.masks, mm.method.counts):
            assert int(m.sum()) == k
            assert torch.all(p[~m] == 0)
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert torch.all(value[~m] == 0)
        mm.verify()


def test_pipeline_order():
    order = []

    class Recorder(Swapper):
        def pre_step(self, manager):
            grads = [p.grad for p in manager.params]
            order.append(("pre", all(bool((g[~m] != 0).any()) for g, m in zip(grads, manager.masks))))

        def post_step(self, manager):
            order.append(("post", None))

    class Tracker(SignFlipTracker):
        def update(self, weights, masks):
            order.append(("track", all(bool((w[~m] == 0).all()) for w, m in zip(weights, masks))))

    model = Net()
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1))
    mm = MaskManager(model, opt, Recorder(0.8), tracker=Tracker())

    def opt_hook(o, a, k):
        order.append(("opt", all(bool((p.grad[~m] == 0).all()) for p, m in zip(mm.params, mm.masks))))

    opt.register_step_pre_hook(opt_hook)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    mm.step()
    # pre-step sees dense grads; the optimizer sees masked grads; the tracker sees masked weights.
    assert order == [("pre", True), ("opt", True), ("track", True), ("post", None)]


@pytest.mark.parametrize("fused", [None, False], ids=["one_pass", "staged"])
def test_both_branches_run_the_stages_in_the_pipeline_order(fused, monkeypatch):
    """The staged pipeline and the one-pass step (run eagerly, so each stage's function is called
    from Python) go through the same stages in the same order; the one-pass step per tensor."""
    import sparseham.ham
    from sparseham._step import masking, mirror, one_pass, signflip

    order = []

    def spy(module, name, label):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: order.append(label) or real(*a, **k))

    class Recorder(Swapper):
        def pre_step(self, manager):
            order.append("pre")

        def post_step(self, manager):
            order.append("post")

    for module, name, label in [(masking, "mask_grads_", "mask"), (masking, "mask_weights_", "mask"),
                                (masking, "masked", "mask"), (one_pass, "base_sgd", "base"),
                                (sparseham.ham, "ham", "mirror"), (mirror, "mirror_factor", "mirror"),
                                (signflip, "update_layer", "track"), (signflip, "track", "track")]:
        spy(module, name, label)
    torch.manual_seed(0)
    model = Net()
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), fused=fused)
    if fused is False:  # the base step of the staged branch, seen from a hook on the base optimizer
        opt.optimizer.register_step_post_hook(lambda *a: order.append("base"))
    mm = MaskManager(model, opt, Recorder(0.8), tracker=SignFlipTracker())
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    order.clear()  # the manager masked the weights when it was built
    with torch.compiler.set_stance("force_eager"):
        mm.step()
    stages = [s for i, s in enumerate(order) if i == 0 or s != order[i - 1]]
    expected = ["mask", "base", "mirror", "mask", "track"]
    if fused is None:  # per managed tensor; the biases take torch's own step first, outside the plan
        assert stages[0] == "pre" and stages[-1] == "post"
        body = stages[1:-1]
        assert body == expected * len(mm.params)
        stages = ["pre", *expected, "post"]
    assert stages == ["pre", *expected, "post"]


def test_churn_is_the_hamming_distance():
    model, opt, mm = _setup()
    mm.mask_events.clear()
    _train_step(model, opt, mm, 0)
    _train_step(model, opt, mm, 1)  # step 2: the method swaps 2 weights per layer
    (event,) = mm.mask_events
    assert event["step"] == 2 and event["churn"].tolist() == [4, 4, 4]


def test_grown_weights_start_at_zero_with_zero_state():
    model, opt, mm = _setup()
    _train_step(model, opt, mm, 0)
    before = [m.clone() for m in mm.masks]
    _train_step(model, opt, mm, 1)
    for p, old, new in zip(mm.params, before, mm.masks):
        grown = new & ~old
        assert int(grown.sum()) == 2
        assert torch.all(p[grown] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][grown] == 0)


def test_state_dict_round_trip_resumes_bit_identically():
    model, opt, mm = _setup(tracker=SignFlipTracker())
    for s in range(3):
        _train_step(model, opt, mm, s)
    snap = copy.deepcopy((model.state_dict(), opt.state_dict(), mm.state_dict()))
    for s in range(3, 6):
        _train_step(model, opt, mm, s)
    model2, opt2, mm2 = _setup(tracker=SignFlipTracker())
    model2.load_state_dict(snap[0])
    opt2.load_state_dict(snap[1])
    mm2.load_state_dict(snap[2])
    for s in range(3, 6):
        _train_step(model2, opt2, mm2, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(mm.masks, mm2.masks))
    assert mm.tracker.read() == mm2.tracker.read()


def test_verify_catches_a_single_revived_weight():
    model, opt, mm = _setup()
    mm.verify()
    pruned = torch.nonzero(~mm.masks[1].view(-1))[0]
    with torch.no_grad():
        mm.params[1].view(-1)[pruned] = 0.5
    with pytest.raises(MaskInvariantError, match=r"^fc1.weight: 1 pruned weights are non-zero$"):
        mm.verify()


def test_verify_catches_drift():
    model, opt, mm = _setup()
    with torch.no_grad():
        mm.params[0][~mm.masks[0]] = 1.0
    with pytest.raises(MaskInvariantError, match="conv.weight: .* pruned weights are non-zero"):
        mm.verify()
    model, opt, mm = _setup()
    mm.expected[1] += 1
    with pytest.raises(MaskInvariantError, match="fc1.weight: mask keeps .* the method asked for"):
        mm.verify()


def test_sparsity_measurements():
    model, opt, mm = _setup()
    total = sum(p.numel() for p in mm.params)
    assert mm.sparsity() == pytest.approx(1 - sum(mm.method.counts) / total, abs=1e-9)
    by_layer = mm.layer_sparsity()
    assert list(by_layer) == mm.names
    for (name, value), p, k in zip(by_layer.items(), mm.params, mm.method.counts):
        assert value == pytest.approx(1 - k / p.numel(), abs=1e-12), name  # by hand: 1 - kept / size
        assert value == pytest.approx(1 - float(mm.masks[mm.names.index(name)].double().mean()), abs=1e-12)


def test_set_masks_checks_length():
    model, opt, mm = _setup()
    with pytest.raises(ValueError, match="expected 3 masks, got 1"):
        mm.set_masks([mm.masks[0]])


def test_grad_scaler_path_unscales_before_hooks():
    seen = []

    class Peek(Swapper):
        def pre_step(self, manager):
            seen.append(manager.params[2].grad.detach().abs().max())

    torch.manual_seed(0)
    model = Net()
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1))
    mm = MaskManager(model, opt, Peek(0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(4, 2, 6, 6)
    scaler.scale(model(x).sum()).backward()
    mm.step(scaler=scaler)
    scaler.update()
    assert seen[0] < 100  # unscaled: a scaled gradient would be ~65536x larger


def test_a_manager_without_an_optimizer_prunes_and_refuses_to_step():
    model = Net()
    mm = MaskManager(model, None, Swapper(0.8))
    mm.verify()
    assert all(torch.all(p[~m] == 0) for p, m in zip(mm.params, mm.masks))
    assert abs(mm.sparsity() - 0.8) < 0.01
    mm.zero_state_([~m for m in mm.masks])  # no state to zero: nothing to do
    with pytest.raises(RuntimeError, match=r"built without an optimizer \(for pruning only\)"):
        mm.step()


@pytest.mark.parametrize("fused", [None, False], ids=["one_pass", "staged"])
def test_a_nonfinite_gradient_is_named_at_the_next_read_not_blamed_on_the_masks(fused):
    """One NaN gradient entry in an own loop: the next read of the manager's counters names the
    layer in one line (no per-step host read), and verify() blames the values, not the masks."""
    model, opt, mm = _setup(fused=fused)
    _train_step(model, opt, mm, 0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    mm.params[1].grad[0, 0] = float("nan")
    mm.step()
    with pytest.warns(UserWarning, match=r"^fc1.weight: \d+ of 1024 weights are NaN or inf.*not from"):
        mm.sparsity()
    _train_step(model, opt, mm, 2)  # the next forward pass spreads it to every layer
    with pytest.raises(MaskInvariantError, match=r"^conv.weight: \d+ of 72 weights are NaN or inf \(and 2"):
        mm.verify()


def test_the_manager_says_in_one_line_what_it_manages_and_counts_tied_weights_once(capsys):
    model = Net()
    model.fc2.weight = nn.Parameter(torch.randn(16, 16))
    model.extra = nn.Linear(16, 16)
    model.extra.weight = model.fc2.weight  # tied
    mm = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), Swapper(0.5))
    line = capsys.readouterr().err
    assert line.startswith("sparseham: managing 3 tensors (") and line.count("\n") == 1, line
    assert "tied: extra.weight = fc2.weight" in line
    assert mm.names == ["conv.weight", "fc1.weight", "fc2.weight"]
    mm.verify()
    MaskManager(model, None, Swapper(0.5), verbose=False)
    assert capsys.readouterr().err == ""


def test_zero_state_takes_flat_indices_as_well_as_masks_and_masking_needs_no_no_grad():
    model, opt, mm = _setup()
    _train_step(model, opt, mm, 0)
    p = mm.params[1]
    buf = opt.state[p]["momentum_buffer"]
    buf.fill_(1.0)
    mm.zero_state_([torch.tensor([0, 5, 17]) if i == 1 else torch.zeros(q.shape, dtype=torch.bool)
                    for i, q in enumerate(mm.params)])
    flat = buf.view(-1)
    assert flat[[0, 5, 17]].eq(0).all() and int((flat == 0).sum()) == 3
    with torch.enable_grad():  # weights that require grad are masked in place all the same
        mm.apply_masks_()
    assert all(torch.all(q[~m] == 0) for q, m in zip(mm.params, mm.masks))

"""SignFlipTracker on hand-made tensors whose flips are known, and the no-sync rule."""

import contextlib

import pytest
import torch
from torch import nn

from sparseham import HAM, MaskManager, Method, SignFlipTracker
from sparseham._step import mirror as _ham_kernels


def _tracker(w0, **kw):
    t = SignFlipTracker(**kw)
    t.attach(["w"], [w0])
    return t


def test_counts_flips_split_by_mask():
    w = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0, 3.0])
    t = _tracker(w)
    mask = torch.tensor([True, True, False, False, True, True])
    w2 = torch.tensor([-1.0, 1.0, -2.0, -2.0, 1.0, 0.0])  # flips: 0, 1 (in mask), 2 (masked)
    t.update([w2], [mask])
    r = t.read()["w"]
    assert (r["unmasked"], r["masked"]) == (2, 1)
    assert r["ever_flipped"] == 3 and r["differs_from_init"] == 3


def test_moves_to_and_from_zero_are_not_flips():
    t = _tracker(torch.tensor([1.0, -1.0]))
    t.update([torch.tensor([0.0, 0.0])], None)
    t.update([torch.tensor([-1.0, 1.0])], None)
    r = t.read()["w"]
    assert r["unmasked"] == 0 and r["masked"] == 0 and r["ever_flipped"] == 0
    assert r["differs_from_init"] == 2  # the sign now differs from the start, without a counted flip


def test_interval_counts_net_flips():
    t = _tracker(torch.tensor([1.0, 1.0]), interval=2)
    t.update([torch.tensor([-1.0, -1.0])], None)  # step 1: not compared
    t.update([torch.tensor([1.0, -1.0])], None)  # step 2: compared against the start
    r = t.read()["w"]
    assert r["unmasked"] == 1  # the first weight flipped and flipped back: net zero


def test_cumulative_and_per_weight_histogram():
    t = _tracker(torch.tensor([1.0, 1.0, 1.0]), per_weight=True)
    for w in ([-1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, -1.0]):
        t.update([torch.tensor(w)], None)
    r = t.read()["w"]
    assert r["unmasked"] == 4
    assert r["hist"] == [1, 1, 0, 1]  # one weight never flipped, one once, one three times
    assert r["ever_flipped"] == 2 and r["differs_from_init"] == 2


def test_memory_is_one_byte_per_weight_plus_one_for_per_weight():
    w = torch.randn(100, 10)
    t = _tracker(w)
    assert sum(c.numel() * c.element_size() for c in t.codes) == w.numel()
    t2 = _tracker(w, per_weight=True)
    assert sum(c.numel() * c.element_size() for c in t2.codes + t2.hists) == 2 * w.numel()


def test_state_dict_round_trip():
    w = torch.tensor([1.0, -1.0, 2.0])
    t = _tracker(w, per_weight=True)
    t.update([-w], None)
    t2 = _tracker(w, per_weight=True)
    t2.load_state_dict(t.state_dict())
    t.update([w], None)
    t2.update([w], None)
    assert t.read() == t2.read()


def test_invalid_interval():
    with pytest.raises(ValueError, match="Invalid interval: 0"):
        SignFlipTracker(interval=0)


class _HalfMask(Method):
    """Keeps the first half of each layer's weights."""

    def setup(self, manager):
        masks = []
        for p in manager.params:
            m = torch.zeros(p.numel(), dtype=torch.bool)
            m[: p.numel() // 2] = True
            masks.append(m.view(p.shape))
        manager.set_masks(masks, expected=[p.numel() // 2 for p in manager.params])


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    def forbidden(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation through Tensor.{name} inside the step")

        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "__bool__", "numpy"):
            m.setattr(torch.Tensor, name, forbidden(name))
        yield


@pytest.mark.compiled
def test_mask_manager_step_never_reads_the_device(monkeypatch):
    # The norm cap reads its scales on the host for CPU tensors (free there); the step is checked
    # as it runs on a device whose values need a sync.
    monkeypatch.setattr(_ham_kernels, "HOST_READS_FREE", frozenset())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=10.0)
    mm = MaskManager(model, opt, _HalfMask(0.5), tracker=SignFlipTracker(per_weight=True))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for step in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:  # the one-pass step compiles on its first call (compilers read values)
            mm.step()
            continue
        with _no_host_reads(monkeypatch):
            mm.step()
    assert opt.one_pass_blocker() is None
    assert mm.tracker.steps == 6  # the tracker did run on every one of those steps
    with _no_host_reads(monkeypatch), pytest.raises(AssertionError, match="Tensor.tolist"):
        mm.tracker.read()  # the check is live: a host read does raise


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_has_no_host_sync():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    mm = MaskManager(model, opt, _HalfMask(0.5), tracker=SignFlipTracker())
    x = torch.randn(8, 64, device="cuda")
    for i in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        if i:
            torch.cuda.set_sync_debug_mode("error")
        try:
            mm.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.compiled
@pytest.mark.parametrize("masked", [True, False])
def test_fused_update_matches_eager(masked):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (4, 3, 2, 2)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.4 for s in shapes] if masked else None
    eager, fused = SignFlipTracker(per_weight=True), SignFlipTracker(per_weight=True, fused=True)
    for t in (eager, fused):
        t.attach(["a", "b"], w0)
    for k in range(4):
        w = [x * torch.where(torch.rand(x.shape, generator=g) < 0.3, -1.0, 1.0) for x in w0]
        w[0][0, k] = 0.0  # moves to zero are not flips
        eager.update(w, masks)
        fused.update(w, masks)
    assert eager.read() == fused.read()
    assert all(torch.equal(a, b) for a, b in zip(eager.codes, fused.codes))

"""The one-pass step's C++ loop (sparseham._step.native) against its Python reference.

The loop is the same arithmetic as :func:`sparseham._step.one_pass.one_pass` in the same order, so
on random inputs (with zeros, NaN and infinities) it gives the same tracker codes, counts and
histogram and the same clamp count, bit for bit, and the same weights and optimizer state to a
float32 rounding (eager ATen divides by a scalar as a multiply by its reciprocal: Adam's
``sqrt(v) / bc2`` can differ by one ulp); the norm cap's sum of squares is accumulated in float64.
The pipeline-level equivalence with the staged path is tests/test_fused_step.py, which runs
through the loop on CPU.
"""

import itertools
import warnings

import pytest
import torch

from sparseham._step import compile as compile_mod
from sparseham._step import native, one_pass

FLAGS = ("momentum", "nesterov", "weight_decay", "decoupled", "mirror", "pre_sign", "count", "norm", "masked",
         "tracked", "split", "hist")
STAGES = ("mirror", "count", "norm", "masked", "tracked", "split", "hist")


def _specs():
    """Every optimizer rule with every stage, and each stage alone (a spread, not all 2^12)."""
    out = []
    for kind, extra in (("sgd", {"momentum": True}), ("sgd", {"momentum": True, "nesterov": True}),
                        ("sgd", {}), ("adam", {}), ("adam", {"decoupled": True})):
        for wd, full in itertools.product((False, True), (False, True)):
            flags = dict(extra, weight_decay=wd or extra.get("decoupled", False))
            if full:
                flags.update(dict.fromkeys(STAGES, True))
            out.append(one_pass.Spec(kind, degree=3 if flags.get("mirror") else None, **flags))
    out += [one_pass.Spec("sgd", momentum=True, mirror=True, pre_sign=True, degree=d) for d in (2, 5)]
    out += [one_pass.Spec("sgd", momentum=True, tracked=True), one_pass.Spec("sgd", masked=True),
            one_pass.Spec("adam", mirror=True, count=True, degree=4, tracked=True, split=True)]
    return out


def _inputs(spec, n, seed):
    g = torch.Generator().manual_seed(seed)
    p, grad = 0.05 * torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    if n > 12:  # exact zeros of both signs, a tiny and a large weight, NaN and infinities
        p[:4] = torch.tensor([0.0, -0.0, 1e-30, -2.0])
        grad[4:9] = torch.tensor([0.0, float("nan"), float("inf"), float("-inf"), 1e3])
        p[9] = float("nan")
    s0, s1 = torch.randn(n, generator=g).abs() * 0.01, torch.rand(n, generator=g) * 1e-4
    state = [s0, s1] if spec.kind == "adam" else [s0 if spec.momentum else None]
    mask = (torch.rand(n, generator=g) < 0.6).view(torch.uint8)
    code = torch.randint(0, 32, (n,), generator=g, dtype=torch.uint8)
    code = (code & 0b11100) | torch.randint(0, 3, (n,), generator=g, dtype=torch.uint8)  # valid last signs
    hist = torch.randint(240, 256, (n,), generator=g, dtype=torch.uint8)  # near the saturation
    track = (code, torch.zeros(2, dtype=torch.int64), mask, hist) if spec.tracked else None
    hits = torch.zeros((), dtype=torch.int64) if spec.count else None
    norms = torch.empty(2) if spec.norm else None
    if spec.kind == "adam":
        hyper = (0.01, 0.01 / (1 - 0.9**3), (1 - 0.999**3) ** 0.5, 0.9, 0.999, 1e-8, 0.1)
    else:
        hyper = (0.05, 0.9, 0.25 if spec.momentum and not spec.nesterov else 0.0, 0.1)
    ham = (0.05, 200.0, 1e-2, 0.02) if spec.mirror else ()
    return [p, grad, state, mask if spec.masked else None, track, hits, norms,
            torch.tensor(hyper, dtype=torch.float64), torch.tensor(ham, dtype=torch.float64)]


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else [None if t is None else t.clone() for t in a]
            if isinstance(a, list) else None if a is None else tuple(t.clone() for t in a) for a in args]


def _name(spec) -> str:
    return "-".join([spec.kind, *(f for f in FLAGS if getattr(spec, f))])


@pytest.mark.parametrize("spec", _specs(), ids=_name)
@pytest.mark.parametrize("n", [1, 37, 4099])
def test_the_loop_equals_the_python_reference(spec, n, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEHAM_KERNEL_CACHE", str(tmp_path))
    if not compile_mod.has_code_generator("cpu"):
        pytest.skip("no C++ compiler")
    kernel = native.load(spec)
    assert kernel >= 0
    args = _inputs(spec, n, seed=n)
    want = _clone(args)
    with torch.no_grad():
        one_pass.one_pass(spec, *want)
        native.step(kernel, *args)
    p, _, state, _, track, hits, norms, _, _ = args
    wp, _, wstate, _, wtrack, whits, wnorms, _, _ = want
    # SGD has no division: the same bits; Adam to a rounding (1e-8 absolute: p - step where they cancel)
    tol = {"rtol": 0, "atol": 0} if spec.kind == "sgd" else {"rtol": 1e-6, "atol": 1e-8}
    torch.testing.assert_close(p, wp, equal_nan=True, **tol)
    for a, b in zip(state, wstate):
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True, **tol)
    if track is not None:
        assert all(torch.equal(a, b) for a, b in zip(track, wtrack))
    if hits is not None:
        assert int(hits) == int(whits)
    if norms is not None:  # float64 accumulation in the loop, float32 in torch's sum
        torch.testing.assert_close(norms, wnorms, rtol=1e-5, atol=0, equal_nan=True)


def test_the_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEHAM_KERNEL_CACHE", str(tmp_path))
    if not compile_mod.has_code_generator("cpu"):
        pytest.skip("no C++ compiler")
    spec = one_pass.Spec("sgd", masked=True, tracked=True)
    built = native._build(spec)
    assert built.parent == tmp_path and built.exists()
    assert native._build(one_pass.Spec("sgd", masked=True)) != built  # one library per spec
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached library"))
    assert native._build(spec) == built


def test_a_failed_build_warns_once_and_the_step_compiles_its_python(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEHAM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: str(tmp_path / "no-such-c++"))
    spec = one_pass.Spec("sgd", momentum=True, hist=True, tracked=True)  # a spec no other test builds
    native.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"C\+\+ one-pass kernel did not build .*torch.compile instead"):
            assert native.load(spec) == -1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load(spec) == -1  # cached: no second warning
    finally:
        native.load.cache_clear()


def test_the_ISA_follows_torch(monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "-mno-avx512f" in native.flags() and "-mno-avx2" not in native.flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert "-mno-avx512f" not in native.flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert {"-mno-avx512f", "-mno-avx2"} <= set(native.flags())


def test_the_loop_applies_to_float32_cpu_with_the_polynomial_exp_only():
    spec = one_pass.Spec("sgd", mirror=True, degree=3)
    cpu = torch.device("cpu")
    assert native.applies(spec, torch.float32, cpu)
    assert not native.applies(spec, torch.float64, cpu)
    assert not native.applies(spec, torch.float32, torch.device("meta"))
    assert not native.applies(one_pass.Spec("sgd", mirror=True, degree=None), torch.float32, cpu)
    assert native.applies(one_pass.Spec("sgd", masked=True), torch.float32, cpu)


@pytest.mark.compiled
def test_one_graph_for_every_shape_and_the_loop_inside_it(capfd, monkeypatch):
    """Dynamo traces the per-tensor kernel once for every size from 2 on: 1x1 convolutions and
    linear weights do not recompile it (their views' bases are not guarded: ``one_pass.flat``
    detaches). A tensor of one entry compiles a second graph (dynamo specializes sizes 0 and 1),
    and that is all. Compiled, the C++ loop runs; the notice of the first compile is printed once."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(one_pass, "_announced", set())
    monkeypatch.setattr(compile_mod, "_said", set())
    one_pass.kernel.cache_clear()  # a kernel of its own: its graphs are counted from zero
    spec = one_pass.Spec("sgd", momentum=True, mirror=True, degree=3, masked=True, tracked=True, split=True)
    kernel = native.load(spec)
    real, calls = native._LOADED[kernel], []
    native._LOADED[kernel] = lambda *a: calls.append(a[-1]) or real(*a)
    flat = one_pass.flat
    before, graphs = counters["stats"]["unique_graphs"], []
    try:
        for shape in [(64, 16, 3, 3), (128, 64, 1, 1), (10, 512), (7,), (3, 1, 5, 5), (1, 1, 1, 1), (1, 1)]:
            p, grad, buf = torch.randn(shape), torch.randn(shape), torch.zeros(shape)
            mask, code = torch.rand(shape) < 0.5, torch.full(shape, 5, dtype=torch.int8)
            track = (flat(code), torch.zeros(2, dtype=torch.int64), flat(mask), None)
            args = one_pass.TensorStep(flat(p), flat(grad), [flat(buf)], flat(mask), track, None, None,
                                       one_pass.scalars((0.1, 0.9, 0.0, 0.0), p.device),
                                       one_pass.scalars((0.1, 20.0, 1e-3, 0.02), p.device))
            with torch.no_grad():
                one_pass._per_tensor_kernel(spec, p)(*args)
            graphs.append(counters["stats"]["unique_graphs"] - before)
    finally:
        native._LOADED[kernel] = real
        one_pass.kernel.cache_clear()
    assert graphs == [1, 1, 1, 1, 1, 2, 2]
    assert calls == [9216, 8192, 5120, 7, 75, 1, 1]
    err = capfd.readouterr().err
    assert err.count("sparseham: compiling the one-pass step for float32 (once per process, ~2 s; "
                     "ham.fused: false skips it)") == 1

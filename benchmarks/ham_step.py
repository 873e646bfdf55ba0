"""Cost of the HAM mirror step next to the SGD-momentum step it wraps (a benchmark, not a test).

``python benchmarks/ham_step.py [--shapes resnet18|resnet50|both] [--repeats N] [--json PATH]``

On the weight tensors (ndim >= 2) of torchvision's ResNet-18 / ResNet-50, float32 on the CPU,
random weights and gradients, one process, repeats interleaved:

- ``sgd``: ``torch.optim.SGD(momentum=0.9, foreach=True).step()``;
- ``ham`` / ``ham_nocap``: the same SGD inside ``sparseham.HAM(foreach=True)``, with the default
  ``max_norm=1000`` and with ``max_norm=None`` (the norm cap is an extra pass);
- ``ham_fused`` / ``ham_fused_nocap``: the same with ``fused=True`` (compile time reported apart):
  over SGD this is the one-pass step (``sparseham._step.one_pass``: the base step and the mirror step
  in one compiled pass per tensor; the cap's norms come from that pass); at the default clamp 0.02
  it computes ``exp`` as a degree-3 polynomial;
- ``ham_fused_nodiag`` / ``ham_fused_diag1``: ``fused=True`` with ``diagnostics=0`` (no clamp
  count) and ``=1`` (a count every step); the default counts every 10th step, so the cost of
  HAM's on-device diagnostics is (ham_fused - ham_fused_nodiag) / SGD (target <= 0.1), and
  (ham_fused_diag1 - ham_fused_nodiag) / SGD on a counted step;
- ``mirror_poly`` / ``mirror_exp``: the compiled mirror pass alone (no base step, no cap, no
  count) at the default clamp, on the same tensors, with the polynomial ``exp_poly_degree`` picks
  and with ``torch.exp``: only the factor's computation differs;
- ``cap_pass``: the norm cap ``cap_norms_`` alone (every kernel runs it after the mirror step),
  next to what the cap adds to the fused step, ``ham_fused - ham_fused_nocap``;
- ``roofline``: one ``torch._foreach_add_(params, grads, alpha=1e-12)``, i.e. read two tensors and
  write one, the least a step that reads the gradient can do.

The mirror-step cost is (HAM - SGD) / SGD, computed per round (the rounds are paired) and given
as median [IQR]; targets: <= 2.0 foreach, <= 0.75 fused. It also checks that HAM with
``sign="half_step"`` keeps no optimizer state beyond SGD's momentum buffers.

On a shared machine, ``--threads 1`` gives far steadier numbers than torch's default. glibc hands
large freed blocks back to the OS, so every step's temporaries (HAM's exponent buffer) page-fault
anew; ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184`` in the
environment shows the cost without that (the machine line reports these variables).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import sparseham
from sparseham._step.mirror import cap_norms_, compiled_pass, exp_poly_degree

if __package__:
    from ._common import interleaved, machine, model_shapes, summarize
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, machine, model_shapes, summarize

LR, MOMENTUM, ALPHA, BETA = 0.01, 0.9, 200.0, 1e-3
CLAMP = 0.02  # HAM's default trust region
TARGETS = {"foreach": 2.0, "fused": 0.75, "diagnostics": 0.1}
HAM_VARIANTS = {  # name: HAM keyword arguments
    "ham": {"foreach": True},
    "ham_nocap": {"foreach": True, "max_norm": None},
    "ham_fused": {"fused": True},
    "ham_fused_nocap": {"fused": True, "max_norm": None},
    "ham_fused_nodiag": {"fused": True, "diagnostics": 0},
    "ham_fused_diag1": {"fused": True, "diagnostics": 1},
}


def _tensors(shapes: list[tuple[int, ...]], seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Conv-init-sized weights (std 0.05) and gradients (std 1e-2): no overflow, no denormals."""
    g = torch.Generator().manual_seed(seed)
    weights = [0.05 * torch.randn(s, generator=g) for s in shapes]
    grads = [1e-2 * torch.randn(s, generator=g) for s in shapes]
    return weights, grads


def _optimizer(weights: list[Tensor], grads: list[Tensor], ham: dict | None) -> torch.optim.Optimizer:
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g  # shared, read-only
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
    return opt if ham is None else sparseham.HAM(opt, ALPHA, BETA, **ham)


def _state_size(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(tensors, bytes) held in ``opt.state``."""
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def _mirror_fns(weights: list[Tensor], grads: list[Tensor]) -> dict:
    """The compiled mirror pass alone with the polynomial and with torch.exp, on one weight copy."""
    mirrored = [w.clone() for w in weights]
    fns = {}
    for name, degree in (("mirror_poly", exp_poly_degree(CLAMP)), ("mirror_exp", None)):
        step = compiled_pass(degree)
        fns[name] = lambda step=step: step(mirrored, grads, mirrored, LR, ALPHA, BETA, CLAMP, False)
    return fns


def _build(shapes: list[tuple[int, ...]], seed: int) -> tuple[dict, dict, dict[str, float]]:
    """The step functions, their optimizers, and the seconds of each fused variant's first step."""
    weights, grads = _tensors(shapes, seed)
    opts = {"sgd": _optimizer(weights, grads, None)}
    opts |= {name: _optimizer(weights, grads, kw) for name, kw in HAM_VARIANTS.items()}
    roof = [w.clone() for w in weights]
    fns = {name: opt.step for name, opt in opts.items()}
    fns |= _mirror_fns(weights, grads)
    fns["roofline"] = lambda: torch._foreach_add_(roof, grads, alpha=1e-12)
    capped = [w.clone() for w in weights]
    fns["cap_pass"] = lambda: cap_norms_(capped, 1e30)  # the eager cap's own pass (never rescales)
    compile_s = {}
    for name in ("ham_fused", "ham_fused_nocap", "ham_fused_nodiag", "ham_fused_diag1"):
        t0 = time.perf_counter()
        opts[name].step()
        compile_s[name] = time.perf_counter() - t0
        for _ in range(10):  # the counted-step graph (every 10th step by default) compiles too
            opts[name].step()
    for name in ("mirror_poly", "mirror_exp"):
        t0 = time.perf_counter()
        fns[name]()
        compile_s[name] = time.perf_counter() - t0
    return fns, opts, compile_s


def _ratio(samples: dict[str, list[float]], ham: str, base: str | None, over: str) -> dict[str, float]:
    """Per round (ham - base) / over (ham / over without a base): median and IQR."""
    r = (np.array(samples[ham]) - (np.array(samples[base]) if base else 0.0)) / np.array(samples[over])
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:6.2f}x [IQR {r['q1']:.2f}-{r['q3']:.2f}]"


def bench(name: str, repeats: int, seed: int) -> dict:
    shapes = [s for s in model_shapes(name) if len(s) >= 2]
    numel = sum(int(np.prod(s)) for s in shapes)
    fns, opts, compile_s = _build(shapes, seed)
    samples = interleaved(fns, repeats=repeats)
    stats = {k: summarize(v) for k, v in samples.items()}
    ratios = {}
    for kind, ham, nocap in (("foreach", "ham", "ham_nocap"), ("fused", "ham_fused", "ham_fused_nocap")):
        ratios[f"mirror/sgd {kind}"] = _ratio(samples, ham, "sgd", "sgd") | {"target": TARGETS[kind]}
        ratios[f"mirror/sgd {kind}, max_norm=None"] = _ratio(samples, nocap, "sgd", "sgd")
        ratios[f"mirror/roofline {kind}"] = _ratio(samples, ham, "sgd", "roofline")
    ratios["norm cap/sgd, inside the fused step"] = _ratio(samples, "ham_fused", "ham_fused_nocap", "sgd")
    ratios["norm cap/sgd, its pass alone"] = _ratio(samples, "cap_pass", None, "sgd")
    ratios["diagnostics/sgd fused"] = _ratio(samples, "ham_fused", "ham_fused_nodiag", "sgd") | {
        "target": TARGETS["diagnostics"]}
    ratios["diagnostics/sgd fused, a counted step"] = _ratio(samples, "ham_fused_diag1", "ham_fused_nodiag",
                                                             "sgd")
    degree = exp_poly_degree(CLAMP)
    ratios[f"mirror pass/sgd, polynomial (degree {degree})"] = _ratio(samples, "mirror_poly", None, "sgd")
    ratios["mirror pass/sgd, torch.exp"] = _ratio(samples, "mirror_exp", None, "sgd")
    ratios["(exp - polynomial)/sgd"] = _ratio(samples, "mirror_exp", "mirror_poly", "sgd")
    ratios["polynomial/exp mirror pass"] = _ratio(samples, "mirror_poly", None, "mirror_exp")
    state = {k: _state_size(opts[k]) for k in ("sgd", "ham", "ham_fused")}
    _print(name, len(shapes), numel, stats, ratios, compile_s, state)
    return {"shapes": name, "tensors": len(shapes), "numel": numel, "clamp": CLAMP, "exp_poly_degree": degree,
            "seconds": {k: vars(s) for k, s in stats.items()}, "ratios": ratios,
            "compile_first_step_s": compile_s,
            "state": {k: {"tensors": t, "bytes": b} for k, (t, b) in state.items()},
            "half_step_extra_state": state["ham"] != state["sgd"] or state["ham_fused"] != state["sgd"]}


def _print(name, n, numel, stats, ratios, compile_s, state) -> None:
    print(f"\n{name}: {n} weight tensors (ndim >= 2), {numel / 1e6:.2f}M float32 elements, "
          f"{next(iter(stats.values())).n} interleaved repeats")
    for k, s in stats.items():
        print(f"  {k:<16} {s.ms()}")
    for k, t in compile_s.items():
        print(f"  {k:<16} first step (torch.compile + run; less with a warm inductor cache): {t:.1f} s")
    for k, r in ratios.items():
        target = f"  (target <= {r['target']:.2f}x)" if "target" in r else ""
        print(f"  {k:<38} {_fmt(r)}{target}")
    extra = state["ham"] != state["sgd"] or state["ham_fused"] != state["sgd"]
    print("  optimizer.state after the steps: " + ", ".join(
        f"{k} {t} tensors / {b / 1e6:.1f} MB" for k, (t, b) in state.items())
        + f" -> HAM(sign='half_step') extra persistent state: {'YES' if extra else 'none'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/ham_step.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("resnet18", "resnet50", "both"), default="both",
                        help="which torchvision model's weight shapes to step (default: both)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and gradients")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine())
    names = ("resnet18", "resnet50") if args.shapes == "both" else (args.shapes,)
    results = [bench(name, args.repeats, args.seed) for name in names]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "lr": LR, "momentum": MOMENTUM,
                                         "alpha": ALPHA, "beta": BETA, "results": results}, indent=2))


if __name__ == "__main__":
    main()

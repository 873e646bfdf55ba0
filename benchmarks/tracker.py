"""Cost of the SignFlipTracker update next to the SGD-momentum step (a benchmark, not a test).

``python benchmarks/tracker.py [--shapes resnet18|resnet50|both] [--repeats N] [--threads 1]
[--prototype] [--json PATH] [--quick]``

On the weight tensors (ndim >= 2) of torchvision's ResNet-18 / ResNet-50, float32, one process,
repeats interleaved (``_common.interleaved``):

- ``sgd``: ``torch.optim.SGD(momentum=0.9, foreach=True).step()`` over those weights;
- ``tracker``: ``SignFlipTracker(interval=1).update(weights, masks)`` with a 50% random bool mask;
- ``tracker_per_weight``: the same with ``per_weight=True`` (one more byte per weight);
- ``tracker_i10`` / ``tracker_i100``: ``interval=10`` / ``100``, timed over that many calls and
  divided by it (the amortized per-step cost);
- ``--prototype`` adds ``tracker_compiled``: ``SignFlipTracker(fused=True)``, the update of all
  layers as one ``torch.compile`` graph, checked bit-identical to the eager tracker first;
- ``--primitives`` adds single eager passes over the same weights, to show what costs what on this
  machine: ``exp`` (``torch._foreach_exp``, as in HAM's mirror step), ``gt`` (``w > 0``, a float
  comparison into bool, as in the tracker), and ``mul_bool`` / ``mul_float``
  (``torch._foreach_mul`` by the 50% mask as bool, as MaskManager masks, or as float32).

The tracker alternates between two weight sets that differ in the sign of 1% of the entries, so
every comparing update finds flips and rewrites its codes. The ratio tracker/SGD is computed per
round (rounds are paired) and given as median [IQR]; target <= 0.5. ``--threads`` defaults to 1:
on a shared 2-core machine, torch's default threads make the numbers far noisier.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sparseham import SignFlipTracker

if __package__:
    from ._common import interleaved, machine, model_shapes, summarize, write_report
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, machine, model_shapes, summarize, write_report

__all__ = ["TARGET", "bench", "main", "paired_ratio", "synced"]

TARGET = 0.5  # tracker / SGD step
LR, MOMENTUM, FLIP_FRACTION = 0.01, 0.9, 0.01


def synced(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, Callable[[], object]]:
    """On CUDA, end every call with a synchronize so that wall time covers the kernels."""
    if device.type != "cuda":
        return fns
    return {k: (lambda f=f: (f(), torch.cuda.synchronize(device))) for k, f in fns.items()}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ``num / den``: median and IQR."""
    r = np.asarray(num) / np.asarray(den)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def _tensors(shapes, device, seed: int) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Weights, the same weights with 1% of signs flipped, gradients, and 50% random masks."""
    g = torch.Generator().manual_seed(seed)
    weights = [0.05 * torch.randn(s, generator=g) for s in shapes]
    flipped = [torch.where(torch.rand(s, generator=g) < FLIP_FRACTION, -w, w)
               for s, w in zip(shapes, weights)]
    grads = [1e-2 * torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
    return tuple([t.to(device) for t in ts] for ts in (weights, flipped, grads, masks))


def _sgd(weights: list[Tensor], grads: list[Tensor]) -> torch.optim.Optimizer:
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)


def _tracker_fn(versions, masks, calls: int, **kwargs) -> Callable[[], None]:
    """``calls`` consecutive ``update()`` calls, alternating between the two weight versions."""
    tracker = SignFlipTracker(**kwargs)
    tracker.attach([str(i) for i in range(len(masks))], versions[0], masks)
    state = {"n": 0}

    def run() -> None:
        for _ in range(calls):
            state["n"] += 1
            tracker.update(versions[state["n"] % 2], masks)

    return run


def _prototype_fn(versions, masks) -> tuple[Callable[[], None], float]:
    """The compiled update; checked against the eager tracker. Returns it and its compile seconds."""
    eager, comp = SignFlipTracker(), SignFlipTracker(fused=True)
    names = [str(i) for i in range(len(masks))]
    eager.attach(names, versions[0], masks)
    comp.attach(names, versions[0], masks)
    t0 = time.perf_counter()
    comp.update(versions[1], masks)
    compile_s = time.perf_counter() - t0
    eager.update(versions[1], masks)
    same = all(torch.equal(a, b) for a, b in zip(eager.codes, comp.codes))
    if not (same and torch.equal(eager.counters(), comp.counters())):
        raise RuntimeError("SignFlipTracker(fused=True) disagrees with the eager tracker")
    state = {"n": 0}

    def run() -> None:
        state["n"] += 1
        comp.update(versions[state["n"] % 2], masks)

    return run, compile_s


def _primitives(weights: list[Tensor], masks: list[Tensor]) -> dict[str, Callable[[], object]]:
    floats = [m.to(weights[0].dtype) for m in masks]
    return {"exp": lambda: torch._foreach_exp(weights),
            "gt": lambda: [torch.gt(w, 0) for w in weights],
            "mul_bool": lambda: torch._foreach_mul(weights, masks),
            "mul_float": lambda: torch._foreach_mul(weights, floats)}


def bench(name: str, repeats: int, *, device: torch.device, seed: int = 0, warmup: int = 2,
          prototype: bool = False, primitives: bool = False, layers: int | None = None,
          verbose: bool = True) -> dict:
    """Time the tracker variants against the SGD step on ``name``'s weight shapes (the first
    ``layers`` of them when given: smoke runs)."""
    shapes = [s for s in model_shapes(name) if len(s) >= 2][:layers]
    numel = sum(math.prod(s) for s in shapes)
    weights, flipped, grads, masks = _tensors(shapes, device, seed)
    versions = (weights, flipped)
    fns = {"sgd": _sgd(weights, grads).step,
           "tracker": _tracker_fn(versions, masks, 1),
           "tracker_per_weight": _tracker_fn(versions, masks, 1, per_weight=True)}
    calls = {"tracker_i10": 10, "tracker_i100": 100}
    for key, k in calls.items():
        fns[key] = _tracker_fn(versions, masks, k, interval=k)
    if primitives:
        fns |= _primitives(weights, masks)
    compile_s = None
    if prototype:
        fns["tracker_compiled"], compile_s = _prototype_fn(versions, masks)
    samples = interleaved(synced(fns, device), repeats=repeats, warmup=warmup)
    for key, k in calls.items():
        samples[key] = [t / k for t in samples[key]]
    ratios = {k: paired_ratio(samples[k], samples["sgd"]) for k in samples if k != "sgd"}
    out = {"shapes": name, "tensors": len(shapes), "numel": numel, "device": str(device),
           "seconds_per_step": {k: vars(summarize(v)) for k, v in samples.items()},
           "ratio_to_sgd": ratios, "target": TARGET, "compile_first_call_s": compile_s}
    if verbose:
        _print(out)
    return out


def _print(out: dict) -> None:
    print(f"\n{out['shapes']}: {out['tensors']} weight tensors, {out['numel'] / 1e6:.2f}M elements "
          f"on {out['device']}, per step (interval k: k calls / k)")
    for k, s in out["seconds_per_step"].items():
        r = out["ratio_to_sgd"].get(k)
        ratio = "" if r is None else f"   /sgd {r['median']:5.2f}x [IQR {r['q1']:.2f}-{r['q3']:.2f}]"
        print(f"  {k:<19} {s['median'] * 1e3:8.3f} ms [IQR {s['q1'] * 1e3:.3f}-{s['q3'] * 1e3:.3f}]{ratio}")
    r = out["ratio_to_sgd"]["tracker"]["median"]
    verdict = "MET" if r <= TARGET else "NOT MET"
    print(f"  tracker (interval=1) / sgd = {r:.2f}x, target <= {TARGET}x: {verdict}")
    if out["compile_first_call_s"] is not None:
        print(f"  tracker_compiled: first call (compile + run) {out['compile_first_call_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/tracker.py", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("resnet18", "resnet50", "both"), default="both",
                        help="which torchvision model's weight shapes (default: both)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, gradients and masks")
    parser.add_argument("--prototype", action="store_true",
                        help="add the torch.compile tracker prototype (compiles for ~20 s per shape set)")
    parser.add_argument("--primitives", action="store_true",
                        help="add single passes (exp, float > 0, mask multiplies) for comparison")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: resnet18's first 4 weights, 2 repeats, 1 warm-up")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    names = ("resnet18", "resnet50") if args.shapes == "both" else (args.shapes,)
    if args.quick:
        names, args.repeats = ("resnet18",), 2
    device = torch.device("cpu")
    results = [bench(n, args.repeats, device=device, seed=args.seed, warmup=1 if args.quick else 2,
                     prototype=args.prototype, primitives=args.primitives,
                     layers=4 if args.quick else None) for n in names]
    return write_report(args.json, results=results)


if __name__ == "__main__":
    main()

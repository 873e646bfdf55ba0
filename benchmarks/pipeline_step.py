"""The whole sparse step, ``MaskManager.step()``, next to the base optimizer's own step (a benchmark).

``python benchmarks/pipeline_step.py [--shapes resnet18|resnet50|both] [--repeats N] [--json PATH]
[--quick]``

On the weight tensors (ndim >= 2) of torchvision's ResNet-18 / ResNet-50, float32, one thread,
random weights and gradients (the gradient is put back before every call, no backward pass):

- ``sgd`` / ``adamw``: ``torch.optim.SGD(momentum=0.9, foreach=True).step()`` and
  ``torch.optim.AdamW(foreach=True).step()`` over the same tensors: the units;
- ``pipeline_<opt>_eager``: ``MaskManager.step()`` with RigL masks (90% ERK, no update in the
  window), ``HAM`` (foreach) around the optimizer and a ``SignFlipTracker`` at interval 1;
- ``pipeline_<opt>_fused``: the same with ``HAM(fused=True)`` and ``SignFlipTracker(fused=True)``;
- ``roofline``: one ``torch._foreach_add_(params, grads)``: read two tensors, write one;
- ``grad_reset``: putting the gradients back alone, which every other variant also pays (a copy).

This is today's staged pipeline (each stage its own pass over the weights); issue 16 targets
<= 1.5x the base step for the fused pipeline. Ratios are per round (the rounds are interleaved)
as median [IQR].
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sparseham import HAM, MaskManager, SignFlipTracker, methods

if __package__:
    from ._common import interleaved, shapes_cli, summarize, weight_shapes, write_report
    from .tracker import paired_ratio
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, shapes_cli, summarize, weight_shapes, write_report
    from tracker import paired_ratio

__all__ = ["TARGET", "bench", "main"]

TARGET = 1.5  # fused pipeline / base step
LR, MOMENTUM, ALPHA, BETA = 0.05, 0.9, 200.0, 1e-3


class _Weights(nn.Module):
    """Just the weight tensors, as parameters named ``w0``, ``w1``, ..."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ws = nn.ParameterList(nn.Parameter(w.clone()) for w in weights)


def _tensors(shapes, seed: int):
    g = torch.Generator().manual_seed(seed)
    return ([0.05 * torch.randn(s, generator=g) for s in shapes],
            [1e-2 * torch.randn(s, generator=g) for s in shapes])


def _base(params, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def _with_grads(params, grads):
    def put() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
    return put


def _variant(weights, grads, opt_name: str, pipeline: str | None):
    model = _Weights(weights)
    params = list(model.parameters())
    put = _with_grads(params, grads)
    put()
    opt = _base(params, opt_name)
    if pipeline is None:
        def step() -> None:
            put()
            opt.step()
        return step
    fused = pipeline == "fused"
    ham = HAM(opt, ALPHA, BETA, fused=fused or None)
    rigl = methods.get("rigl")(0.9, distribution="erk", update_every=10**6)
    mm = MaskManager(model, ham, rigl, SignFlipTracker(interval=1, fused=fused), include=["ws.*"],
                     total_steps=10**7)

    def step() -> None:
        put()
        mm.step()
    return step


def bench(name: str, repeats: int, seed: int = 0) -> dict:
    shapes = weight_shapes(name)
    weights, grads = _tensors(shapes, seed)
    fns, compile_s = {}, {}
    for opt_name in ("sgd", "adamw"):
        fns[opt_name] = _variant(weights, grads, opt_name, None)
        for pipeline in ("eager", "fused"):
            key = f"pipeline_{opt_name}_{pipeline}"
            fns[key] = _variant(weights, grads, opt_name, pipeline)
            t0 = time.perf_counter()
            fns[key]()  # the first call compiles the fused kernels
            compile_s[key] = time.perf_counter() - t0
    params, gs = [w.clone() for w in weights], [g.clone() for g in grads]
    fns["roofline"] = lambda: torch._foreach_add_(params, gs, alpha=1e-12)
    fns["grad_reset"] = _with_grads([nn.Parameter(w.clone()) for w in weights], grads)
    samples = interleaved(fns, repeats=repeats, warmup=2)
    ratios = {k: paired_ratio(v, samples["adamw" if "adamw" in k else "sgd"])
              for k, v in samples.items() if k not in ("sgd", "adamw")}
    out = {"model": name, "tensors": len(shapes), "numel": sum(w.numel() for w in weights),
           "seconds": {k: vars(summarize(v)) for k, v in samples.items()}, "ratio_over_base": ratios,
           "first_call_s": compile_s, "target": TARGET}
    _print(out)
    return out


def _print(out: dict) -> None:
    print(f"\n{out['model']}: {out['tensors']} tensors, {out['numel'] / 1e6:.2f}M floats")
    for k, s in out["seconds"].items():
        r = out["ratio_over_base"].get(k)
        rel = "" if r is None else f"  {r['median']:.2f}x [IQR {r['q1']:.2f}-{r['q3']:.2f}] the base step"
        print(f"  {k:<22} {s['median'] * 1e3:8.2f} ms{rel}")
    for opt in ("sgd", "adamw"):
        r = out["ratio_over_base"][f"pipeline_{opt}_fused"]["median"]
        verdict = "MET" if r <= TARGET else "NOT MET"
        print(f"  fused pipeline / {opt}: {r:.2f}x, target <= {TARGET}x: {verdict}")


def main(argv: list[str] | None = None) -> dict:
    names, repeats, json_path = shapes_cli("pipeline_step.py", __doc__, argv,
                                           shapes=("resnet18", "resnet50", "both"), repeats=10)
    return write_report(json_path, results=[bench(n, repeats) for n in names])


if __name__ == "__main__":
    main()

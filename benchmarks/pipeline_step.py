"""The whole sparse step, ``MaskManager.step()``, next to the base optimizer's own step (a benchmark).

``python benchmarks/pipeline_step.py [--shapes resnet18|resnet50|both] [--repeats N] [--json PATH]
[--quick]``

On the weight tensors (ndim >= 2) of torchvision's ResNet-18 / ResNet-50, float32, one thread,
random weights and gradients (the gradient is put back before every call, no backward pass):

- ``sgd`` / ``adamw``: ``torch.optim.SGD(momentum=0.9, foreach=True).step()`` and
  ``torch.optim.AdamW(foreach=True).step()`` over the same tensors: the units;
- ``<opt>_pipeline_staged``: ``MaskManager.step()`` with RigL masks (90% ERK, no update in the
  window), ``HAM(fused=False)`` (foreach, the norm cap at 1000) around the optimizer and a
  ``SignFlipTracker`` at interval 1: every stage its own pass;
- ``<opt>_pipeline_one_pass``: the same with HAM's default ``fused=None``: the one-pass step
  (``sparseham._step.one_pass``) does every stage but the norm cap in one pass per tensor;
  ``..._no_cap``: with ``max_norm=None``, to show the cap's own pass;
- ``<opt>_ham_staged`` / ``<opt>_ham_one_pass[_no_cap]``: ``HAM.step()`` alone (base step plus
  mirror step), no masks and no tracker;
- ``kernel_sgd``, ``kernel_+mirror``, ``kernel_+masks``, ``kernel_+tracker`` (CPU): the one-pass
  kernel alone, per tensor, its stages added one at a time: where its time goes;
  ``kernel_calls_only``: the last one over 64-entry tensors, as many calls: the host cost of a call;
- ``roofline``: one ``torch._foreach_add_(params, grads)``: read two tensors, write one;
- ``grad_reset``: putting the gradients back alone, which every other variant also pays (a copy).

Issue 16's targets: <= 1.5x the base step for the one-pass pipeline, <= 1.25x for HAM alone.
Ratios are per round (the rounds are interleaved)
as median [IQR].
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sparseham import HAM, MaskManager, SignFlipTracker, methods
from sparseham._step import one_pass

if __package__:
    from ._common import interleaved, shapes_cli, summarize, weight_shapes, write_report
    from .tracker import paired_ratio, synced
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, shapes_cli, summarize, weight_shapes, write_report
    from tracker import paired_ratio, synced

__all__ = ["TARGET", "bench", "main"]

TARGET = 1.5  # the one-pass pipeline / base step
TARGET_HAM = 1.25  # HAM alone (base step + mirror step), one pass / base step
LR, MOMENTUM, ALPHA, BETA = 0.05, 0.9, 200.0, 1e-3


class _Weights(nn.Module):
    """Just the weight tensors, as parameters named ``w0``, ``w1``, ..."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ws = nn.ParameterList(nn.Parameter(w.clone()) for w in weights)


def _tensors(shapes, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    return ([(0.05 * torch.randn(s, generator=g)).to(device) for s in shapes],
            [(1e-2 * torch.randn(s, generator=g)).to(device) for s in shapes])


def _base(params, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def _with_grads(params, grads):
    def put() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
    return put


def _variant(weights, grads, opt_name: str, variant: str | None):
    """One timed step: the base optimizer (``None``), HAM alone or the whole pipeline, staged or one pass."""
    model = _Weights(weights)
    params = list(model.parameters())
    put = _with_grads(params, grads)
    put()
    opt = _base(params, opt_name)
    if variant is None:
        def step() -> None:
            put()
            opt.step()
        return step
    stage, mode = variant.split("_", 1)
    one_pass = mode.startswith("one_pass")
    ham = HAM(opt, ALPHA, BETA, fused=None if one_pass else False,
              max_norm=None if mode.endswith("no_cap") else 1000.0)
    if stage == "ham":
        def ham_step() -> None:
            put()
            ham.step()
        return ham_step
    rigl = methods.get("rigl")(0.9, distribution="erk", update_every=10**6)
    mm = MaskManager(model, ham, rigl, SignFlipTracker(interval=1), include=["ws.*"], total_steps=10**7)

    def step() -> None:
        put()
        mm.step()
    return step


# The one-pass kernel's stages, added one at a time (SGD with momentum, ResNet weights): where its
# time goes. Each row calls sparseham._step.one_pass's per-tensor kernel directly, as HAM does on CPU.
STAGES = {
    "kernel_sgd": {},
    "kernel_+mirror": {"mirror": True, "degree": 3},
    "kernel_+masks": {"mirror": True, "degree": 3, "masked": True},
    "kernel_+tracker": {"mirror": True, "degree": 3, "masked": True, "tracked": True, "split": True},
}


def _stage(weights, grads, flags: dict, numel: int | None = None):
    """One row of STAGES: the kernel over every tensor (``numel``: tiny tensors, the same count,
    so the row is the host cost of the calls alone), the gradients put back as every row does."""
    if numel is not None:
        weights, grads = [w.reshape(-1)[:numel] for w in weights], [g.reshape(-1)[:numel] for g in grads]
    params = [nn.Parameter(w.clone()) for w in weights]
    put = _with_grads(params, grads)
    put()
    bufs = [torch.zeros_like(p) for p in params]
    masks = [torch.rand(p.shape, device=p.device) < 0.1 for p in params]
    codes = [torch.full(p.shape, 5, dtype=torch.int8, device=p.device) for p in params]
    counts = [torch.zeros(2, dtype=torch.int64, device=p.device) for p in params]
    kernel = one_pass.kernel((one_pass.Spec("sgd", momentum=True, **flags),), False)
    hyper = one_pass.scalars((LR, MOMENTUM, 0.0, 0.0), params[0].device)
    ham = one_pass.scalars((LR, ALPHA, BETA, 0.02), params[0].device)
    flat = one_pass.flat

    @torch.no_grad()
    def step() -> None:
        put()
        for p, b, m, c, n in zip(params, bufs, masks, codes, counts):
            kernel(flat(p), flat(p.grad), [flat(b)], flat(m), (flat(c), n, flat(m), None), None, None, hyper,
                   ham)
    return step


VARIANTS = ("pipeline_staged", "pipeline_one_pass", "pipeline_one_pass_no_cap", "ham_staged", "ham_one_pass",
            "ham_one_pass_no_cap")


def bench(name: str, repeats: int, seed: int = 0, device: torch.device | None = None) -> dict:
    """Every variant on ``name``'s weight shapes (``"quick"``: two small tensors), on ``device``."""
    device = device or torch.device("cpu")
    shapes = weight_shapes(name)
    weights, grads = _tensors(shapes, seed, device)
    fns, compile_s = {}, {}
    for opt_name in ("sgd", "adamw"):
        fns[opt_name] = _variant(weights, grads, opt_name, None)
        for variant in VARIANTS:
            key = f"{opt_name}_{variant}"
            fns[key] = _variant(weights, grads, opt_name, variant)
            t0 = time.perf_counter()
            synced({key: fns[key]}, device)[key]()  # the first call compiles the one-pass kernels
            compile_s[key] = time.perf_counter() - t0
    if device.type not in one_pass.GROUPED:  # where the one-pass step calls a kernel per tensor
        for key, flags in STAGES.items():
            fns[key] = _stage(weights, grads, flags)
        fns["kernel_calls_only"] = _stage(weights, grads, STAGES["kernel_+tracker"], numel=64)
        for key in (*STAGES, "kernel_calls_only"):
            fns[key]()  # compile
    params, gs = [w.clone() for w in weights], [g.clone() for g in grads]
    fns["roofline"] = lambda: torch._foreach_add_(params, gs, alpha=1e-12)
    fns["grad_reset"] = _with_grads([nn.Parameter(w.clone()) for w in weights], grads)
    samples = interleaved(synced(fns, device), repeats=repeats, warmup=2)
    ratios = {k: paired_ratio(v, samples["adamw" if k.startswith("adamw") else "sgd"])
              for k, v in samples.items() if k not in ("sgd", "adamw")}
    out = {"model": name, "device": str(device), "tensors": len(shapes),
           "numel": sum(w.numel() for w in weights),
           "seconds": {k: vars(summarize(v)) for k, v in samples.items()}, "ratio_over_base": ratios,
           "first_call_s": compile_s, "target": TARGET, "target_ham": TARGET_HAM}
    _print(out)
    return out


def _print(out: dict) -> None:
    print(f"\n{out['model']} on {out['device']}: {out['tensors']} tensors, "
          f"{out['numel'] / 1e6:.2f}M floats")
    for k, s in out["seconds"].items():
        r = out["ratio_over_base"].get(k)
        rel = "" if r is None else f"  {r['median']:.2f}x [IQR {r['q1']:.2f}-{r['q3']:.2f}] the base step"
        print(f"  {k:<22} {s['median'] * 1e3:8.2f} ms{rel}")
    for opt in ("sgd", "adamw"):
        for key, target in ((f"{opt}_pipeline_one_pass", TARGET), (f"{opt}_ham_one_pass", TARGET_HAM)):
            r = out["ratio_over_base"][key]["median"]
            verdict = "MET" if r <= target else f"NOT MET by {r - target:.2f}x"
            print(f"  {key} / {opt}: {r:.2f}x, target <= {target}x: {verdict}")


def main(argv: list[str] | None = None) -> dict:
    names, repeats, json_path = shapes_cli("pipeline_step.py", __doc__, argv,
                                           shapes=("resnet18", "resnet50", "both"), repeats=10)
    return write_report(json_path, results=[bench(n, repeats) for n in names])


if __name__ == "__main__":
    main()

"""One RigL mask update: time and peak extra tensor memory, against a full-sort update and rigl-torch.

``python benchmarks/rigl_update.py [--model torchvision:resnet50] [--sparsity 0.9] [--repeats N]
[--threads 1] [--json PATH] [--quick]``

Issue 35's targets, printed with verdicts, the CPU model and its vector ISA: >= 20x faster than
rigl-torch 0.5.2's update in the same process (ResNet-50, 90% uniform), peak extra memory <= 1.5
bytes per managed weight, masks identical to a stable full sort (ties to the lower flat index, the
rule that makes them identical on every device and FSDP shard).

**rigl-torch** (``pip install rigl-torch==0.5.2``, outside the repo: ``PYTHONPATH=<dir>`` works;
skipped, and said so, where it is not importable): its ``RigLScheduler`` on an identical copy of
the model, ``sparsity_distribution="uniform"`` (its first layer and Linear layers dense), the dense
gradients put in its hooks, its update (``_rigl_step``, what it runs every ``delta`` steps) timed.
Ours runs on the same layers at the same density (``distribution="uniform"``, rigl-torch's dense
layers excluded). The ratio is rigl-torch / ours per interleaved round.

A real :class:`sparseham.MaskManager` with ``methods.get("rigl")(0.9, distribution="erk",
update_every=1, reference=False)`` (the disjoint rule) manages every Conv/Linear weight of the model
(ResNet-50: 54 tensors, 25.5M
weights), with random dense gradients and SGD momentum buffers in place. One update is what
``MaskManager.step()`` runs on an update step besides the ordinary stages:
``method.pre_step`` (grow set: top-k of |grad| among inactive weights), the step counter advancing,
and ``method.post_step`` (drop by |w| among active weights, zero the grown weights' momentum,
``set_masks``: install, re-mask weights and state, record churn).

The baseline ``naive`` does the same per layer with a full ``torch.sort(stable=True)`` of the
scores, the first ``k`` indices, and an ``index_fill_`` to build each mask; it yields identical
masks (checked). Both run on their own identical copy, repeats interleaved; the speed-up is
naive/rigl per round. Target: >= 10x.

Peak extra memory: on CPU, ``torch.profiler.profile(profile_memory=True)`` records every tensor
allocation and free of the CPU allocator with its size; the running sum of those events over the
update, its maximum, is the peak of live tensor bytes above what was live before (kthvalue's
internal copy and index buffer included; non-tensor heap use is not). On CUDA,
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``. Target: <= 2 bytes per
managed weight.

It also times what every step (not only update steps) spends on masking: ``mask_grads_`` plus
``apply_masks_`` (grads, weights and momentum times the bool masks) against the SGD step.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sparseham import MaskManager, methods
from sparseham.models import build_model

if __package__:
    from ._common import interleaved, isa_line, machine, summarize, verdict, write_report
    from .tracker import paired_ratio, synced
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, isa_line, machine, summarize, verdict, write_report
    from tracker import paired_ratio, synced

__all__ = ["MEMORY_TARGET", "RIGL_TORCH_TARGET", "SPEEDUP_TARGET", "bench", "bench_rigl_torch", "main",
           "naive_update", "peak_extra_bytes", "rigl_update", "setup"]

# bytes per managed weight (issue 35; 2.0 before); naive / rigl (issue 2); rigl-torch / rigl (issue 35)
MEMORY_TARGET, SPEEDUP_TARGET, RIGL_TORCH_TARGET = 1.5, 10.0, 20.0


def _inputs(model: str) -> dict[str, int]:
    if model.startswith("torchvision:"):
        return {"num_classes": 1000, "in_channels": 3, "image_size": 224}
    return {"num_classes": 10, "in_channels": 3, "image_size": 32}


def _model(model: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The model with dense random gradients and SGD momentum buffers (one step taken)."""
    torch.manual_seed(seed)
    net = build_model(model, **_inputs(model)).to(device)
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = (1e-2 * torch.randn(p.shape, generator=gen)).to(device)
    return net


def setup(model: str, sparsity: float, device: torch.device, seed: int = 0, *, distribution: str = "erk",
          exclude: list[str] | None = None) -> MaskManager:
    """A MaskManager with RigL due to update on every step, dense gradients and momentum in place."""
    net = _model(model, device, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.step()  # creates the momentum buffers the update must mask and zero
    method = methods.get("rigl")(sparsity, distribution=distribution, update_every=1, end=1.0,
                                 reference=False)
    return MaskManager(net, opt, method, exclude=exclude, total_steps=10**9)


def rigl_update(mm: MaskManager) -> None:
    """The update path of an update step; stages 2-5 of ``mm.step()`` would run in between."""
    mm.method.pre_step(mm)
    mm.step_count += 1
    mm.method.post_step(mm)


def _sort_topk(scores: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest scores by a full stable sort (ties to the lower index)."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, order, True).view(scores.shape)


def naive_update(mm: MaskManager) -> None:
    """The same update with a full sort per selection, as much research code does it."""
    rigl, step = mm.method, mm.step_count + 1
    grow, new = [], []
    for p, m, d, k in zip(mm.params, mm.masks, rigl._drops(mm, step), rigl.counts):
        g = _sort_topk(torch.where(m, -torch.inf, p.grad.abs()), d)
        keep = _sort_topk(torch.where(m, p.detach().abs(), -torch.inf), k - d)
        grow.append(g)
        new.append(keep | g)
    mm.step_count += 1
    mm.zero_state_(grow)
    mm.set_masks(new, expected=rigl.counts)


def _window(events, name: str) -> tuple[int, int]:
    """(peak, net) of the running sum of memory events inside the record_function ``name``."""
    span = next(e for e in events if e.name() == name)
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if span.start_ns() <= e.start_ns() <= span.end_ns():
            live += e.nbytes()
            peak = max(peak, live)
    return peak, live


def peak_extra_bytes(fns: dict[str, Callable[[], object]], device: torch.device,
                     prime: Callable[[], object] | None = None) -> dict[str, tuple[int, int]]:
    """``(peak, net)`` tensor bytes that each of ``fns``, run in order, allocates above those live
    before it (see the module docstring). On CPU, ``prime`` runs first inside the profile, so that
    tensors the measured calls free were allocated while profiling and their frees are counted."""
    out = {}
    if device.type == "cuda":
        if prime is not None:
            prime()
        for name, fn in fns.items():
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            out[name] = (peak, torch.cuda.memory_allocated(device) - base)
        return out
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        if prime is not None:
            prime()
        for name, fn in fns.items():
            with torch.profiler.record_function(f"measured:{name}"):
                fn()
    events = prof.profiler.kineto_results.events()
    return {name: _window(events, f"measured:{name}") for name in fns}


def _calibrate(device: torch.device) -> int:
    """The peak the method reports for one 4 MiB tensor: it must read 4194304."""
    return peak_extra_bytes({"t": lambda: torch.empty(2**20, device=device).fill_(1.0)}, device)["t"][0]


def _update_peak(mm: MaskManager, device: torch.device) -> dict[str, int]:
    """Peak over the real update, with the grow masks held across the optimizer step counted."""

    def post() -> None:
        mm.step_count += 1
        mm.method.post_step(mm)

    m = peak_extra_bytes({"pre": lambda: mm.method.pre_step(mm), "post": post}, device,
                         prime=lambda: rigl_update(mm))
    (pre_peak, held), (post_peak, _) = m["pre"], m["post"]
    return {"peak": max(pre_peak, held + post_peak), "pre_step_peak": pre_peak,
            "held_across_step": held, "post_step_peak": post_peak}


def _masking_cost(mm: MaskManager, repeats: int, device: torch.device) -> dict:
    """Every step's stages 2 and 4 (``mask_grads_`` and ``apply_masks_``, bool masks) against the
    SGD-momentum step itself, interleaved."""
    fns = {"optimizer_step": mm.optimizer.step, "masking": lambda: (mm.mask_grads_(), mm.apply_masks_())}
    samples = interleaved(synced(fns, device), repeats=repeats)
    return {"seconds": {k: vars(summarize(v)) for k, v in samples.items()},
            "ratio_to_optimizer_step": paired_ratio(samples["masking"], samples["optimizer_step"])}


def bench(model: str, sparsity: float, repeats: int, *, device: torch.device, seed: int = 0,
          warmup: int = 1, verbose: bool = True) -> dict:
    mms = {"rigl": setup(model, sparsity, device, seed), "naive": setup(model, sparsity, device, seed)}
    n = sum(p.numel() for p in mms["rigl"].params)
    rigl_update(mms["rigl"])
    naive_update(mms["naive"])
    same = all(torch.equal(a, b) for a, b in zip(mms["rigl"].masks, mms["naive"].masks))
    if not same:
        raise RuntimeError("the full-sort update chose other masks than RigL's update")
    fns = {"rigl": lambda: rigl_update(mms["rigl"]), "naive": lambda: naive_update(mms["naive"])}
    samples = interleaved(synced(fns, device), repeats=repeats, warmup=warmup)
    memory = _update_peak(mms["rigl"], device)
    memory["naive_peak"] = peak_extra_bytes({"naive": fns["naive"]}, device, prime=fns["naive"])["naive"][0]
    mms["rigl"].verify()
    masking = _masking_cost(mms["rigl"], max(repeats, 5), device)
    out = {"model": model, "sparsity": sparsity, "device": str(device), "managed_weights": n,
           "tensors": len(mms["rigl"].params), "identical_masks": same,
           "seconds": {k: vars(summarize(v)) for k, v in samples.items()},
           "speedup_naive_over_rigl": paired_ratio(samples["naive"], samples["rigl"]),
           "memory_bytes": memory, "calibration_4MiB": _calibrate(device),
           "peak_bytes_per_weight": memory["peak"] / n,
           "naive_peak_bytes_per_weight": memory["naive_peak"] / n,
           "per_step_masking": masking,
           "targets": {"speedup_min": SPEEDUP_TARGET, "bytes_per_weight_max": MEMORY_TARGET}}
    if verbose:
        _print(out)
    return out


def _rigl_torch(model: str, sparsity: float, device: torch.device, seed: int):
    """rigl-torch's scheduler on its own copy of the model, due to update on every call, and the
    names of the layers it keeps dense; ``None`` where rigl-torch is not importable."""
    try:
        from rigl_torch.RigL import RigLScheduler
    except ImportError:
        return None
    net = _model(model, device, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    torch.manual_seed(seed)
    scheduler = RigLScheduler(net, opt, dense_allocation=1 - sparsity, T_end=10**9,
                              sparsity_distribution="uniform")
    for w, hook in zip(scheduler.W, scheduler.backward_hook_objects):
        if hook is not None:
            hook.dense_grad = w.grad.clone()  # what its backward hook would have stored
    names = {id(p): n for n, p in net.named_parameters()}
    dense = [names[id(w)] for w, s in zip(scheduler.W, scheduler.S) if s <= 0]
    return scheduler, dense


def bench_rigl_torch(model: str, sparsity: float, repeats: int, *, device: torch.device, seed: int = 0,
                     verbose: bool = True) -> dict:
    """Our update against rigl-torch 0.5.2's, interleaved in this process (see the module docstring)."""
    made = _rigl_torch(model, sparsity, device, seed)
    if made is None:
        out = {"skipped": "rigl-torch is not importable (pip install rigl-torch==0.5.2, outside the repo)"}
        if verbose:
            print(f"\nrigl-torch: {out['skipped']}; the comparison is skipped")
        return out
    scheduler, dense = made
    mm = setup(model, sparsity, device, seed, distribution="uniform", exclude=dense)
    # _rigl_step: the update its __call__ runs every ``delta`` steps (at step 0: drop fraction 0.3, as ours)
    fns = {"ours": lambda: rigl_update(mm), "rigl_torch": scheduler._rigl_step}
    samples = interleaved(synced(fns, device), repeats=repeats, warmup=1)
    n = sum(p.numel() for p in mm.params)
    memory = _update_peak(mm, device)
    out = {"model": model, "sparsity": sparsity, "distribution": "uniform", "dense_layers": dense,
           "managed_weights": n, "tensors": len(mm.params),
           "version": importlib.metadata.version("rigl-torch"),
           "seconds": {k: vars(summarize(v)) for k, v in samples.items()},
           "speedup_rigl_torch_over_ours": paired_ratio(samples["rigl_torch"], samples["ours"]),
           "memory_bytes": memory, "peak_bytes_per_weight": memory["peak"] / n}
    if verbose:
        sp, sec = out["speedup_rigl_torch_over_ours"], out["seconds"]
        print(f"\n{model} at {sparsity:.0%} uniform ({', '.join(dense)} dense, as rigl-torch "
              f"{out['version']}): {out['tensors']} sparse tensors, {n / 1e6:.2f}M weights")
        for k, v in sec.items():
            iqr = f"[IQR {v['q1'] * 1e3:.1f}-{v['q3'] * 1e3:.1f}]"
            print(f"  {k:<10} {v['median'] * 1e3:9.1f} ms {iqr} per update")
        print("  " + verdict(f"rigl-torch / ours (IQR {sp['q1']:.1f}-{sp['q3']:.1f})", sp["median"],
                             RIGL_TORCH_TARGET, upper=False, unit="x"))
        print("  " + verdict("ours, peak extra memory", out["peak_bytes_per_weight"], MEMORY_TARGET,
                             unit=" B/weight"))
    return out


def _print(out: dict) -> None:
    n, mem, sp = out["managed_weights"], out["memory_bytes"], out["speedup_naive_over_rigl"]
    print(f"\n{out['model']} at {out['sparsity']:.0%} ERK on {out['device']}: {out['tensors']} managed "
          f"tensors, {n / 1e6:.2f}M weights; masks identical to the full-sort update: "
          f"{out['identical_masks']}")
    for k, s in out["seconds"].items():
        iqr = f"[IQR {s['q1'] * 1e3:.1f}-{s['q3'] * 1e3:.1f}]"
        print(f"  {k:<6} {s['median'] * 1e3:9.1f} ms {iqr} per update")
    met = "MET" if sp["median"] >= SPEEDUP_TARGET else "NOT MET"
    print(f"  speed-up naive/rigl {sp['median']:.1f}x [IQR {sp['q1']:.1f}-{sp['q3']:.1f}], "
          f"target >= {SPEEDUP_TARGET:.0f}x: {met}")
    print(f"  method check: one 4 MiB tensor reads {out['calibration_4MiB']} bytes")
    print("  peak extra tensor bytes: "
          + ", ".join(f"{k} {v / 1e6:.1f} MB ({v / n:.2f} B/weight)" for k, v in mem.items()))
    m = out["per_step_masking"]
    r = m["ratio_to_optimizer_step"]
    print(f"  every step: mask_grads_ + apply_masks_ {m['seconds']['masking']['median'] * 1e3:.1f} ms, "
          f"{r['median']:.2f}x [IQR {r['q1']:.2f}-{r['q3']:.2f}] the SGD-momentum step "
          f"({m['seconds']['optimizer_step']['median'] * 1e3:.1f} ms)")
    print("  " + verdict("rigl peak extra memory", out["peak_bytes_per_weight"], MEMORY_TARGET,
                         unit=" B/weight"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/rigl_update.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:resnet50",
                        help="a sparseham.models name or torchvision:<name> (default torchvision:resnet50)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="ERK target sparsity (default 0.9)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, gradients and masks")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet20, 2 repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.repeats = "resnet20", 2
    print(machine())
    print(isa_line())
    cpu = torch.device("cpu")
    result = bench(args.model, args.sparsity, args.repeats, device=cpu, seed=args.seed)
    versus = bench_rigl_torch(args.model, args.sparsity, args.repeats, device=cpu, seed=args.seed)
    return write_report(args.json, result=result, rigl_torch=versus)


if __name__ == "__main__":
    main()

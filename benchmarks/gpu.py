"""Every sparseham performance check on one CUDA card, in one go (about 5 minutes on an H100).

``python benchmarks/gpu.py [--json PATH] [--quick] [--threads 1]``

On CUDA, with ResNet-18 sizes, each section timed with a synchronize after every call:

1. ``ham_step``: foreach SGD-momentum vs HAM (foreach and fused/Triton) on torchvision ResNet-18's
   weights; targets mirror/SGD <= 2.0 foreach, <= 0.75 fused (as benchmarks/ham_step.py).
2. ``tracker``: SignFlipTracker update vs the SGD step (benchmarks/tracker.py, with the compiled
   prototype); target <= 0.5.
3. ``rigl_update``: one RigL update on torchvision ResNet-18 at 90% ERK vs a full-sort update, peak
   extra memory from ``torch.cuda.max_memory_allocated`` (benchmarks/rigl_update.py); targets
   >= 10x, <= 2 bytes per managed weight.
4. ``pipeline``: resnet18_cifar, batch 256, bf16 autocast: plain loop vs the sparseham variants
   (benchmarks/pipeline.py); targets plain/trainer >= 0.9, HAM + tracking <= 3% of the step.
5. ``pipeline_step``: ``MaskManager.step()`` (RigL masks, HAM, tracker at interval 1) staged and
   as the one-pass step (one compiled Triton graph per group), and HAM alone, against the foreach
   SGD and AdamW steps, on ResNet-18's weights (benchmarks/pipeline_step.py); targets one-pass
   pipeline <= 1.5x, HAM alone <= 1.25x the base step.
6. ``syncs``: after warm-up, ``MaskManager.step()`` under ``torch.cuda.set_sync_debug_mode("error")``
   for 20 steps that include RigL update steps (target: zero host syncs), and the number of syncs
   per ``Trainer.train_step`` counted with ``set_sync_debug_mode("warn")``.

Without CUDA it says so and runs the same code on the CPU with tiny sizes and no torch.compile
(a smoke run that judges no target, exit 0); ``--quick`` picks those sizes on a CUDA machine too.
A failing section is recorded and the others still run; the exit status is 1 when a section
failed or a host sync was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseham import HAM, MaskManager, SignFlipTracker, methods

if __package__:
    from . import ham_step, pipeline, pipeline_step, rigl_update, tracker
    from ._common import interleaved, machine, model_shapes, summarize
else:  # run as a script: benchmarks/ is on sys.path
    import ham_step
    import pipeline
    import pipeline_step
    import rigl_update
    import tracker
    from _common import interleaved, machine, model_shapes, summarize

__all__ = ["main"]

OVERHEAD_TARGET_PCT = 3.0


def bench_ham(device: torch.device, repeats: int, layers: int | None, fused: bool = True) -> dict:
    """SGD vs HAM foreach (and fused) on ResNet-18 weight shapes, on ``device``."""
    shapes = [s for s in model_shapes("resnet18") if len(s) >= 2][:layers]
    weights, grads = (
        [t.to(device) for t in ts] for ts in ham_step._tensors(shapes, seed=0)
    )
    opts = {"sgd": ham_step._optimizer(weights, grads, None)}
    variants = {k: kw for k, kw in ham_step.HAM_VARIANTS.items() if fused or not kw.get("fused")}
    opts |= {k: ham_step._optimizer(weights, grads, kw) for k, kw in variants.items()}
    compile_s = {}
    for k in (k for k, kw in variants.items() if kw.get("fused")):
        t0 = time.perf_counter()
        opts[k].step()
        compile_s[k] = time.perf_counter() - t0
    samples = interleaved(tracker.synced({k: o.step for k, o in opts.items()}, device), repeats=repeats)
    ratios = {f"mirror/sgd {k}": ham_step._ratio(samples, k, "sgd", "sgd") for k in variants}
    out = {"seconds": {k: vars(summarize(v)) for k, v in samples.items()}, "ratios": ratios,
           "compile_first_step_s": compile_s, "targets": {"foreach": 2.0, "fused": 0.75}}
    print("\nham_step: " + ", ".join(f"{k} {r['median']:.2f}x" for k, r in ratios.items()))
    return out


def _train_batch(mm: MaskManager, batch, amp) -> None:
    x, y = batch
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(mm.model(x).float(), y)
    loss.backward()


def _debug_mode(device: torch.device, mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for a block; nothing on the CPU (no syncs to find)."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scope():
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return scope()


def check_syncs(model: str, batch: int, device: torch.device, amp, steps: int = 20) -> dict:
    """Host syncs inside ``MaskManager.step()`` (must be none) and per ``Trainer.train_step``."""
    batches = pipeline._batches(model, batch, device, seed=0, count=2)
    net = pipeline._model(model, device, seed=0)
    opt = HAM(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), 50.0, 1e-3)
    every = 5
    method = methods.get("rigl")(0.9, distribution="erk", update_every=every)
    mm = MaskManager(net, opt, method, SignFlipTracker(), total_steps=1000)
    for i in range(3):  # warm-up: momentum buffers, lazy CUDA state, one RigL update at step 5 later
        _train_batch(mm, batches[i % 2], amp)
        mm.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    checked, updates, error = 0, 0, None
    for i in range(steps):
        _train_batch(mm, batches[i % 2], amp)
        events = len(mm.mask_events)
        try:
            with _debug_mode(device, "error"):
                mm.step()
        except RuntimeError as exc:
            error = f"step {mm.step_count + 1}: {exc}"
            break
        checked += 1
        updates += len(mm.mask_events) > events  # a RigL topology update ran in this call
        opt.zero_grad(set_to_none=True)
    trainer = pipeline._trainer(net, mm, device, amp)
    trainer.train_step([batches[0]])  # warm-up of the stand-in
    with warnings.catch_warnings(record=True) as caught, _debug_mode(device, "warn"):
        warnings.simplefilter("always")
        trainer.train_step([batches[1]])
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    out = {"checked": device.type == "cuda", "steps_checked": checked, "update_steps_checked": updates,
           "mm_step_error": error, "trainer_step_syncs": len(syncs) if device.type == "cuda" else None,
           "trainer_sync_messages": syncs}
    what = "checked under set_sync_debug_mode('error')" if out["checked"] else "run (no CUDA: not checked)"
    print(f"\nsyncs: {checked} MaskManager.step() calls {what}, {updates} of them RigL updates; "
          f"error: {error}; syncs per Trainer.train_step: {out['trainer_step_syncs']}")
    return out


def _get(tree: dict, *keys):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _step_ratio(r: dict, variant: str) -> float | None:
    return _get(r, "pipeline_step", "ratio_over_base", variant, "median")


def _verdicts(r: dict) -> dict:
    """Each target against its measured value (None where the section did not measure it)."""
    syncs = r.get("syncs", {})
    found = int(syncs.get("mm_step_error") is not None) if syncs.get("checked") else None
    rows = {  # name: (measured, target, True if the target is an upper bound)
        "HAM foreach mirror/sgd": (_get(r, "ham_step", "ratios", "mirror/sgd ham", "median"), 2.0, True),
        "HAM fused mirror/sgd": (_get(r, "ham_step", "ratios", "mirror/sgd ham_fused", "median"), 0.75, True),
        "tracker/sgd": (_get(r, "tracker", "ratio_to_sgd", "tracker", "median"), tracker.TARGET, True),
        "rigl speed-up vs sort": (_get(r, "rigl_update", "speedup_naive_over_rigl", "median"),
                                  rigl_update.SPEEDUP_TARGET, False),
        "rigl peak B/weight": (_get(r, "rigl_update", "peak_bytes_per_weight"),
                               rigl_update.MEMORY_TARGET, True),
        "plain/trainer": (_get(r, "pipeline", "ratio_plain_over_trainer_amortized", "median"),
                          pipeline.TARGET, False),
        "HAM+tracking % of step": (_get(r, "pipeline", "ham_tracking_overhead_pct", "median"),
                                   OVERHEAD_TARGET_PCT, True),
        "one-pass pipeline/sgd": (_step_ratio(r, "sgd_pipeline_one_pass"), pipeline_step.TARGET, True),
        "one-pass pipeline/adamw": (_step_ratio(r, "adamw_pipeline_one_pass"), pipeline_step.TARGET, True),
        "one-pass HAM/sgd": (_step_ratio(r, "sgd_ham_one_pass"), pipeline_step.TARGET_HAM, True),
        "mm.step() host syncs": (found, 0, True),
    }
    return {k: {"measured": v, "target": ("<= " if upper else ">= ") + str(t),
                "met": None if v is None else (v <= t if upper else v >= t)}
            for k, (v, t, upper) in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    print(machine())
    card = torch.cuda.get_device_name(device) if cuda else None
    print(f"CUDA device: {card}" if cuda else
          "No CUDA device: nothing is recorded for the GPU; running the CPU-runnable parts with tiny sizes "
          "(a smoke run).")
    amp = torch.bfloat16
    reps = 2 if quick else 30
    sections = {
        "ham_step": lambda: bench_ham(device, reps, 4 if quick else None, fused=not quick),
        "tracker": lambda: tracker.bench("resnet18", reps, device=device, warmup=1 if quick else 3,
                                         prototype=not quick, layers=4 if quick else None),
        "rigl_update": lambda: rigl_update.bench("resnet20" if quick else "torchvision:resnet18", 0.9,
                                                 2 if quick else 10, device=device),
        "pipeline": lambda: pipeline.bench("lenet5" if quick else "resnet18_cifar", 16 if quick else 256,
                                           reps, device=device, amp=amp, warmup=1 if quick else 5),
        "pipeline_step": lambda: pipeline_step.bench("quick" if quick else "resnet18", reps, device=device),
        "syncs": lambda: check_syncs("lenet5" if quick else "resnet18_cifar", 16 if quick else 256,
                                     device, amp),
    }
    results, failed = {}, []
    for name, run in sections.items():
        try:
            results[name] = run()
        except Exception as exc:  # record and go on: one run of this script should yield everything it can
            failed.append(name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"\n{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    verdicts = _verdicts(results)
    if quick:  # tiny sizes say nothing about the targets
        verdicts = {k: v | {"met": None} for k, v in verdicts.items()}
    print("\nSummary" + (" (smoke run: tiny sizes, not a measurement)" if quick else ""))
    for k, v in verdicts.items():
        status = ("smoke run" if quick else "n/a") if v["met"] is None else ("MET" if v["met"] else "NOT MET")
        measured = "-" if v["measured"] is None else f"{v['measured']:.3g}"
        print(f"  {k:<24} {measured:>8}  target {v['target']:<6} {status}")
    report = {"machine": machine(), "cuda": cuda, "device_name": card, "quick": quick,
              "torch": torch.__version__, "results": results, "verdicts": verdicts, "failed": failed}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    sync_found = results.get("syncs", {}).get("mm_step_error") is not None
    return 1 if failed or (cuda and sync_found) else 0


if __name__ == "__main__":
    sys.exit(main())

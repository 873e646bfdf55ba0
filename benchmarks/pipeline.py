"""Training throughput of the sparseham pipeline next to a plain PyTorch loop (a benchmark, not a test).

``python benchmarks/pipeline.py [--models lenet5,resnet20] [--batch 128] [--repeats N] [--threads 1]
[--json PATH] [--quick]``

Every variant owns its copy of the same model (same seed), cycles through the same batches of
``build_data("synthetic", ...)`` shaped like the real inputs (LeNet-5: 1x28x28, ResNet-20:
3x32x32; ``llama_tiny``, the Llama of configs/lm_rigl_ham.yaml, gets 128-byte windows of the
standard library's sources, and its throughput is also given in tokens/s), and uses the same SGD
(lr 0.05, momentum 0.9, weight decay 5e-4, as build_optimizer
makes it). One timed call is one training step; the variants run interleaved:

- ``plain``: forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad()``; no sparseham;
- ``ham``: the same with the SGD wrapped in ``HAM(alpha=50, beta=1e-3)`` (configs/default.yaml);
- ``tracker``: the plain loop plus ``SignFlipTracker(interval=1).update`` after the step;
- ``masks``: ``MaskManager(RigL 90% ERK, update every 100 steps).step()`` over plain SGD;
- ``pipeline``: ``MaskManager(RigL) + HAM(SGD) + SignFlipTracker``, ``mm.step()`` in a plain loop,
  HAM at its default ``fused=None``: the one-pass step (``ham`` uses it too);
- ``pipeline_staged``: the same with ``HAM(fused=False)``: every stage its own pass;
- ``trainer``: the same objects driven through ``sparseham.train.trainer.Trainer.train_step``
      itself, on
  a stand-in that holds what the step reads (no run directory, no file I/O): BatchNorm buffer
  snapshot, the per-step finite-loss-and-gradient guard, the logger's accumulators, the LR schedule;
  ``trainer_staged``: the same with ``HAM(fused=False)``.

Throughput is batch / median step. RigL updates only every 100 steps and a median ignores the odd
update step, so one update's cost (timed on the pipeline's own manager afterwards) is added as
``update / 100`` to every trainer step in the amortized ratio plain/trainer. Target: >= 0.97.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sparseham import HAM, MaskManager, SignFlipTracker, methods
from sparseham.data import build_data
from sparseham.data.text import read_corpus, windows
from sparseham.models import build_causal_lm, build_model
from sparseham.params import prunable_parameters
from sparseham.train.build import lr_factor
from sparseham.train.logger import RunLogger
from sparseham.train.trainer import Trainer

if __package__:
    from ._common import interleaved, machine, summarize, write_report
    from .tracker import paired_ratio, synced
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, machine, summarize, write_report
    from tracker import paired_ratio, synced

__all__ = ["INPUTS", "TARGET", "bench", "main"]

TARGET = 0.97  # plain / trainer throughput ratio (issue 16; it was 0.9)
INPUTS = {"lenet5": (1, 28), "resnet20": (3, 32), "resnet18_cifar": (3, 32), "llama_tiny": (0, 128)}
# configs/lm_rigl_ham.yaml's model; its INPUTS entry is (no channels, sequence length).
LLAMA_TINY = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512}
LR, MOMENTUM, WD, ALPHA, BETA, SPARSITY, UPDATE_EVERY, TOTAL = 0.05, 0.9, 5e-4, 50.0, 1e-3, 0.9, 100, 10_000


class _Accumulators:
    """What ``Trainer.train_step`` reads from its RunLogger: the device-side batch accumulators."""

    record_batch = RunLogger.record_batch

    def __init__(self, device: torch.device) -> None:
        self._loss = torch.zeros((), device=device)
        self._correct = torch.zeros((), dtype=torch.int64, device=device)
        self._seen = 0
        self.events: list[dict] = []

    def event(self, record: dict) -> None:
        self.events.append(record)


def _model(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    channels, size = INPUTS[name]
    if name == "llama_tiny":
        model = build_causal_lm("LlamaForCausalLM", vocab_size=256, seq_len=size, options=LLAMA_TINY)
        return model.to(device)
    return build_model(name, num_classes=10, in_channels=channels, image_size=size).to(device)


def _managed(model: torch.nn.Module) -> list[str] | None:
    """What the trainer manages by default: a language model names its own projections."""
    return getattr(model, "default_managed", None)


def _sgd(model: torch.nn.Module, ham: bool, fused: bool | None = None) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return HAM(opt, ALPHA, BETA, fused=fused) if ham else opt


def _manager(model, opt, tracker: bool) -> MaskManager:
    """RigL at 90% ERK, updating every 100 steps, with or without a tracker."""
    rigl = methods.get("rigl")(SPARSITY, distribution="erk", update_every=UPDATE_EVERY)
    return MaskManager(model, opt, rigl, SignFlipTracker() if tracker else None, _managed(model),
                       total_steps=TOTAL)


def _loop(model, step, batches, amp) -> Callable[[], None]:
    """One plain training step per call, cycling through ``batches``; ``step`` replaces opt.step()."""
    it = {"i": 0}
    device_type = batches[0][0].device.type

    def run() -> None:
        x, y = batches[it["i"] % len(batches)]
        it["i"] += 1
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        step()

    return run


def _plain_step(opt, extra=None):
    def step() -> None:
        opt.step()
        if extra is not None:
            extra()
        opt.zero_grad(set_to_none=True)

    return step


def _mm_step(mm: MaskManager):
    def step() -> None:
        mm.step()
        mm.optimizer.zero_grad(set_to_none=True)

    return step


def _trainer(model, mm: MaskManager, device: torch.device, amp) -> Trainer:
    """A Trainer holding just what ``train_step`` reads; ``on_nonfinite="skip"`` so a bad step
    is counted in ``skipped`` instead of writing a checkpoint."""
    t = Trainer.__new__(Trainer)
    t.device, t.amp, t.net, t.model, t.accum, t.scaler = device, amp, model, model, 1, None
    t.opt, t.mm, t.logger, t.step, t.skipped = mm.optimizer, mm, _Accumulators(device), 0, 0
    t.teacher = None  # no distillation
    t.cfg = SimpleNamespace(train=SimpleNamespace(on_nonfinite="skip"),
                            optim=SimpleNamespace(grad_clip=None, sam=SimpleNamespace(rho=None)))
    t.steps_per_epoch = 1
    t.sched = torch.optim.lr_scheduler.LambdaLR(mm.optimizer, lambda s: lr_factor(
        s, total=TOTAL, warmup=0, name="cosine", milestones=(), gamma=0.1))
    t.buffers = list(model.buffers())
    t.buffers_before = [b.clone() for b in t.buffers]
    return t


def _variants(name, batches, device, amp, seed) -> tuple[dict, dict]:
    """The step functions, and the objects the report reads afterwards."""
    fns, keep = {}, {}
    m = _model(name, device, seed)
    fns["plain"] = _loop(m, _plain_step(_sgd(m, False)), batches, amp)
    m = _model(name, device, seed)
    fns["ham"] = _loop(m, _plain_step(_sgd(m, True)), batches, amp)
    m = _model(name, device, seed)
    tr = SignFlipTracker()
    weights = [p for _, p in prunable_parameters(m, _managed(m))]
    tr.attach([str(i) for i in range(len(weights))], weights)
    fns["tracker"] = _loop(m, _plain_step(_sgd(m, False), lambda: tr.update(weights, None)), batches, amp)
    m = _model(name, device, seed)
    fns["masks"] = _loop(m, _mm_step(_manager(m, _sgd(m, False), False)), batches, amp)
    m = _model(name, device, seed)
    keep["pipeline"] = _manager(m, _sgd(m, True), True)
    fns["pipeline"] = _loop(m, _mm_step(keep["pipeline"]), batches, amp)
    m = _model(name, device, seed)
    fns["pipeline_staged"] = _loop(m, _mm_step(_manager(m, _sgd(m, True, fused=False), True)), batches, amp)
    for key, fused in (("trainer", None), ("trainer_staged", False)):
        m = _model(name, device, seed)
        keep[key] = _trainer(m, _manager(m, _sgd(m, True, fused=fused), True), device, amp)
        fns[key] = _trainer_step(keep[key], batches)
    return fns, keep


def _trainer_step(t: Trainer, batches) -> Callable[[], None]:
    it = {"i": 0}

    def step() -> None:
        t.train_step([batches[it["i"] % len(batches)]])
        it["i"] += 1

    return step


def _update_seconds(mm: MaskManager, batch, repeats: int, device: torch.device) -> float:
    """Median seconds of one RigL update (pre_step, counter, post_step) on ``mm``, forced due,
    with the dense gradients of ``batch`` in place."""
    x, y = batch
    F.cross_entropy(mm.model(x).float(), y).backward()
    every, mm.method.options.update_every = mm.method.options.update_every, 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm.method.pre_step(mm)
        mm.step_count += 1
        mm.method.post_step(mm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    mm.method.options.update_every = every
    mm.optimizer.zero_grad(set_to_none=True)
    return summarize(times).median


def _batches(name: str, batch: int, device: torch.device, seed: int, count: int = 8) -> list:
    channels, size = INPUTS[name]
    if name == "llama_tiny":
        rows = windows(read_corpus("stdlib", batch * count * (size + 1)), size).long()
        return [(w[:, :-1].to(device), w[:, 1:].reshape(-1).to(device)) for w in rows.split(batch)]
    options = {"channels": channels, "size": size, "classes": 10, "train_size": batch * count,
               "test_size": batch}
    data = build_data("synthetic", batch_size=batch, seed=seed, synthetic=options)
    return [(x.to(device), y.to(device)) for x, y in data.train.epoch(0)]


def bench(name: str, batch: int, repeats: int, *, device: torch.device, amp: torch.dtype | None = None,
          seed: int = 0, warmup: int = 2, verbose: bool = True) -> dict:
    """Interleaved step times of every variant on ``name``; see the module docstring."""
    batches = _batches(name, batch, device, seed)
    fns, keep = _variants(name, batches, device, amp, seed)
    samples = interleaved(synced(fns, device), repeats=repeats, warmup=warmup)
    update_s = _update_seconds(keep["pipeline"], batches[0], max(1, min(repeats, 3)), device)
    amortized = [t + update_s / UPDATE_EVERY for t in samples["trainer"]]
    amortized_staged = [t + update_s / UPDATE_EVERY for t in samples["trainer_staged"]]
    stats = {k: summarize(v) for k, v in samples.items()}
    # HAM + tracking as a share of the step: 1 - masks/pipeline per round (quartiles swap sides).
    share = paired_ratio(samples["masks"], samples["pipeline"])
    overhead = {"median": 100 * (1 - share["median"]), "q1": 100 * (1 - share["q3"]),
                "q3": 100 * (1 - share["q1"])}
    out = {"model": name, "batch": batch, "device": str(device), "amp": str(amp), "repeats": repeats,
           "seconds_per_step": {k: vars(s) for k, s in stats.items()},
           "samples_per_s": {k: batch / s.median for k, s in stats.items()},
           "tokens_per_s": {k: batch * INPUTS[name][1] / s.median for k, s in stats.items()}
           if name == "llama_tiny" else None,
           "ratio_plain_over": {k: paired_ratio(samples["plain"], v)
                                for k, v in samples.items() if k != "plain"},
           "rigl_update_s": update_s,
           "ratio_plain_over_trainer_amortized": paired_ratio(samples["plain"], amortized),
           "ratio_plain_over_trainer_staged_amortized": paired_ratio(samples["plain"], amortized_staged),
           "ham_tracking_overhead_pct": overhead,
           "rigl_updates_in_window": len(keep["trainer"].mm.mask_events) - 1,
           "skipped_steps": keep["trainer"].skipped, "target": TARGET}
    if verbose:
        _print(out)
    return out


def _tokens(out: dict, variant: str) -> str:
    return f" {out['tokens_per_s'][variant]:8.0f} tokens/s" if out["tokens_per_s"] else ""


def _print(out: dict) -> None:
    print(f"\n{out['model']}, batch {out['batch']} on {out['device']} (autocast {out['amp']}), "
          f"{out['repeats']} interleaved steps per variant")
    for k, s in out["seconds_per_step"].items():
        r = out["ratio_plain_over"].get(k)
        rel = "" if r is None else f"   plain/{k} {r['median']:.3f} [IQR {r['q1']:.3f}-{r['q3']:.3f}]"
        print(f"  {k:<15} {s['median'] * 1e3:8.2f} ms [IQR {s['q1'] * 1e3:.2f}-{s['q3'] * 1e3:.2f}] "
              f"{out['samples_per_s'][k]:8.0f} samples/s{_tokens(out, k)}{rel}")
    o, a = out["ham_tracking_overhead_pct"], out["ratio_plain_over_trainer_amortized"]
    print(f"  HAM + tracking: {o['median']:.1f}% [IQR {o['q1']:.1f}-{o['q3']:.1f}] of the pipeline step "
          "(1 - masks/pipeline)")
    print(f"  one RigL update {out['rigl_update_s'] * 1e3:.1f} ms, amortized over {UPDATE_EVERY} steps; "
          f"{out['rigl_updates_in_window']} fell in the window; skipped steps {out['skipped_steps']}")
    verdict = "MET" if a["median"] >= TARGET else f"NOT MET by {TARGET - a['median']:.3f}"
    print(f"  plain/trainer (amortized) {a['median']:.3f} [IQR {a['q1']:.3f}-{a['q3']:.3f}], "
          f"target >= {TARGET}: {verdict}")
    s = out["ratio_plain_over_trainer_staged_amortized"]
    print(f"  plain/trainer_staged (amortized) {s['median']:.3f} [IQR {s['q1']:.3f}-{s['q3']:.3f}]")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/pipeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet5,resnet20",
                        help=f"comma-separated, from {', '.join(INPUTS)} (default lenet5,resnet20)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved steps per variant (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and data")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: lenet5, batch 16, 2 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(INPUTS)}")
    if args.quick:
        names, args.batch, args.repeats = ["lenet5"], 16, 2
    print(machine())
    device = torch.device("cpu")
    results = [bench(n, args.batch, args.repeats, device=device, seed=args.seed,
                     warmup=1 if args.quick else 2) for n in names]
    return write_report(args.json, results=results)


if __name__ == "__main__":
    main()

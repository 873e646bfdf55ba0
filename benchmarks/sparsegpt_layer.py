"""One SparseGPT layer: time and peak extra memory of sparseham's solver against the authors' code.

``python benchmarks/sparsegpt_layer.py [--reference /tmp/ref/sparsegpt.py] [--rows 2048] [--columns 2048]
[--tokens 4096] [--repeats 3] [--threads 1] [--json PATH] [--quick]``

Both solve the same layer: a float32 weight ``(rows, columns)`` and the Hessian ``H = 2 X^T X / N`` of
``N = tokens`` Gaussian inputs with per-feature scales ``exp(N(0, 1))``, seeded. Timed is the prune
itself, given ``H`` (accumulating ``H`` is one matmul in both): :func:`sparseham.oneshot.sparsegpt`
against ``SparseGPT.fasterprune`` of IST-DASLab/sparsegpt ``sparsegpt.py`` (blocksize 128, 1%
dampening), loaded from ``--reference`` (with its ``quant.py`` beside it; the repository carries no
copy of it), in this process, interleaved, for unstructured 50% and 2:4. The reference prunes
``int(n * s) + 1`` weights per block; it runs at ``s = (n/2 - 0.5) / n``, which is exactly half, so
both solve the same problem and their outputs are compared (max abs difference).

Peak extra memory: tensor bytes allocated above those live before the call, from the CPU
profiler (:func:`rigl_update.peak_extra_bytes`). Without ``--reference`` only sparseham is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import torch
from torch import nn

from sparseham.oneshot import Stats, sparsegpt

if __package__:
    from ._common import interleaved, machine, summarize, write_report
    from .rigl_update import peak_extra_bytes
    from .tracker import paired_ratio
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, machine, summarize, write_report
    from rigl_update import peak_extra_bytes
    from tracker import paired_ratio

__all__ = ["bench", "load_reference", "main"]


def load_reference(path: Path):
    """The authors' ``sparsegpt.py`` as a module (its folder, holding ``quant.py``, goes on sys.path)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("reference_sparsegpt", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _layer(rows: int, columns: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=g)
    x = torch.randn(tokens, columns, generator=g) * torch.exp(torch.randn(columns, generator=g))
    stats = Stats(columns, weight.device, hessian=True)
    stats.add(x)
    return weight, stats.hessian()


def _reference_run(ref, weight: torch.Tensor, hessian: torch.Tensor, pattern: tuple[int, int] | None):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    gpt = ref.SparseGPT(layer)
    gpt.H = hessian.clone()
    n = layer.weight.numel() if weight.shape[1] <= 128 else weight.shape[0] * 128
    sparsity = 0.0 if pattern else (n / 2 - 0.5) / n  # exactly half of every block (see the docstring)
    prunen, prunem = (pattern[1] - pattern[0], pattern[1]) if pattern else (0, 0)
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA; this runs on the CPU
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its time and error
            gpt.fasterprune(sparsity, prunen=prunen, prunem=prunem, blocksize=128, percdamp=0.01)
    finally:
        torch.cuda.synchronize = synchronize
    return layer.weight.data


def bench(rows: int, columns: int, tokens: int, repeats: int, reference: Path | None, seed: int = 0) -> list:
    weight, hessian = _layer(rows, columns, tokens, seed)
    ref = load_reference(reference) if reference else None
    results = []
    for label, pattern in (("unstructured 50%", None), ("2:4", (2, 4))):
        how = {"pattern": pattern} if pattern else {"prune": weight.numel() // 2}
        fns = {"sparseham": lambda how=how: sparsegpt(weight, hessian, **how)}
        if ref is not None:
            fns["reference"] = lambda pattern=pattern: _reference_run(ref, weight, hessian, pattern)
        samples = interleaved(fns, repeats=repeats, warmup=1)
        memory = {k: peak_extra_bytes({k: fn}, torch.device("cpu"))[k][0] for k, fn in fns.items()}
        out = {"case": label, "shape": [rows, columns], "tokens": tokens,
               "seconds": {k: vars(summarize(v)) for k, v in samples.items()}, "peak_extra_bytes": memory}
        if ref is not None:
            mine = fns["sparseham"]().weight
            out["max_abs_difference"] = float((mine - fns["reference"]()).abs().max())
            out["speedup_reference_over_sparseham"] = paired_ratio(samples["reference"], samples["sparseham"])
        results.append(out)
        _print(out)
    return results


def _print(out: dict) -> None:
    print(f"\n{out['case']}, layer {out['shape'][0]}x{out['shape'][1]}, H from {out['tokens']} tokens:")
    for k, s in out["seconds"].items():
        print(f"  {k:<9} {s['median']:8.3f} s [IQR {s['q1']:.3f}-{s['q3']:.3f}], "
              f"peak extra {out['peak_extra_bytes'][k] / 2**20:.1f} MiB")
    if "speedup_reference_over_sparseham" in out:
        sp = out["speedup_reference_over_sparseham"]
        print(f"  reference/sparseham time {sp['median']:.2f}x [IQR {sp['q1']:.2f}-{sp['q3']:.2f}]; "
              f"outputs differ by at most {out['max_abs_difference']:.2e}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/sparsegpt_layer.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, help="the authors' sparsegpt.py (quant.py beside it)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration rows behind H (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 64x256 layer, 2 repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.columns, args.tokens, args.repeats = 64, 256, 512, 2
    print(f"{machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.reference is None:
        print("no --reference given: sparseham only")
    results = bench(args.rows, args.columns, args.tokens, args.repeats, args.reference)
    return write_report(args.json, cpu_capability=torch.backends.cpu.get_cpu_capability(), results=results)


if __name__ == "__main__":
    main()

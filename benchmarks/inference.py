"""Inference with an exported sparse model against the dense one (a benchmark, not a test).

``python benchmarks/inference.py [--repeats N] [--threads 1] [--json PATH] [--quick]``

CPU: each layer as a matmul ``W @ X``, dense ``torch.mm`` against ``torch.sparse.mm`` with ``W`` in
CSR (the ``sparse`` export's layout) at 90/95/98% random unstructured sparsity, for the layers of
LeNet-300-100 (784→300, 300→100, 100→10; X: features × batch 128) and of ResNet-20 as im2col
matmuls (16·9→16, 32·9→32, 64·9→64 channels; X: in·9 × batch 32 · the layer's H·W). The ratio is
dense / sparse time per round: below 1 the sparse product is slower, and it says so.

CUDA (only where a GPU is present; a CPU run reports it skipped): a 2:4 semi-structured bf16
``nn.Linear`` (``torch.sparse.to_sparse_semi_structured``) of a transformer MLP block (4096→16384)
against the dense one at batch sizes 1, 32 and 256.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

if __package__:
    from ._common import interleaved, machine, summarize, write_report
else:  # run as a script: benchmarks/ is on sys.path
    from _common import interleaved, machine, summarize, write_report

SPARSITIES = (0.9, 0.95, 0.98)
LENET300 = [("lenet300.fc1", 300, 784, 128), ("lenet300.fc2", 100, 300, 128), ("lenet300.fc3", 10, 100, 128)]
RESNET20 = [("resnet20.stage1", 16, 16 * 9, 32 * 32 * 32), ("resnet20.stage2", 32, 32 * 9, 32 * 16 * 16),
            ("resnet20.stage3", 64, 64 * 9, 32 * 8 * 8)]


def _layer(out: int, fan_in: int, columns: int, sparsity: float, gen: torch.Generator):
    w = torch.randn(out, fan_in, generator=gen)
    keep = torch.rand(out, fan_in, generator=gen) >= sparsity
    w = w * keep
    x = torch.randn(fan_in, columns, generator=gen)
    return w, w.to_sparse_csr(), x


def cpu(repeats: int, quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    layers = (LENET300 + RESNET20)[: 2 if quick else None]
    for name, out, fan_in, columns in layers:
        for sparsity in SPARSITIES[: 1 if quick else None]:
            w, csr, x = _layer(out, fan_in, columns if not quick else min(columns, 256), sparsity, gen)
            torch.testing.assert_close(torch.sparse.mm(csr, x), w @ x, rtol=1e-4, atol=1e-4)
            fns = {"dense": lambda w=w, x=x: w @ x, "csr": lambda csr=csr, x=x: torch.sparse.mm(csr, x)}
            samples = interleaved(fns, repeats=repeats)
            d, s = summarize(samples["dense"]), summarize(samples["csr"])
            ratios = sorted(a / b for a, b in zip(samples["dense"], samples["csr"]))
            rows.append({"layer": name, "shape": [out, fan_in], "columns": x.shape[1], "sparsity": sparsity,
                         "dense_ms": 1e3 * d.median, "csr_ms": 1e3 * s.median,
                         "dense_over_csr": ratios[len(ratios) // 2]})
            ratio = rows[-1]["dense_over_csr"]
            print(f"{name:<16} {out:>3}x{fan_in:<5} x{x.shape[1]:<6} s={sparsity:.2f}  dense "
                  f"{1e3 * d.median:8.3f} ms  csr {1e3 * s.median:8.3f} ms  dense/csr {ratio:5.2f}"
                  f"{'  (sparse slower)' if ratio < 1 else ''}")
    return rows


def cuda(repeats: int) -> dict:
    if not torch.cuda.is_available():
        print("CUDA: no CUDA device; the 2:4 semi-structured part is skipped")
        return {"skipped": "no CUDA device"}
    from torch.sparse import to_sparse_semi_structured

    rows = []
    dense = torch.nn.Linear(4096, 16384, bias=False).half().cuda().to(torch.bfloat16)
    mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(16384, 1024)
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = torch.nn.Linear(4096, 16384, bias=False).cuda().to(torch.bfloat16)
    sparse.weight = torch.nn.Parameter(to_sparse_semi_structured(dense.weight.detach()), requires_grad=False)
    for batch in (1, 32, 256):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)

        def timed(layer, x=x):
            layer(x)
            torch.cuda.synchronize()

        samples = interleaved({"dense": lambda: timed(dense), "2:4": lambda: timed(sparse)}, repeats=repeats)
        d, s = summarize(samples["dense"]), summarize(samples["2:4"])
        rows.append({"batch": batch, "dense_ms": 1e3 * d.median, "semi_structured_ms": 1e3 * s.median,
                     "dense_over_sparse": d.median / s.median})
        print(f"CUDA 2:4 bf16 Linear 4096->16384 batch {batch:>3}: dense {1e3 * d.median:.3f} ms, "
              f"2:4 {1e3 * s.median:.3f} ms, dense/2:4 {d.median / s.median:.2f}")
    return {"device": torch.cuda.get_device_name(), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/inference.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="two layers, one sparsity, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    print(machine())
    return write_report(args.json, quick=args.quick, cpu=cpu(repeats, args.quick), cuda=cuda(repeats))


if __name__ == "__main__":
    main()

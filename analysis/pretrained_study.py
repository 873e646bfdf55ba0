"""One-shot pruning plus recovery on two pretrained subjects (issue 31's evidence), resumable:

    python -m sparseham.analysis.pretrained_study run minilm|llama --csv CSV [--cells N] [--root data]
    python -m sparseham.analysis.pretrained_study table CSV --out docs/study/pretrained

with ``CSV`` = ``docs/study/pretrained/cells.csv`` (the committed rows).

The grid (:func:`grid`), per subject:

- ``dense`` (Llama only; MiniLM's dense cosine is 1 by definition): the metric of the dense model.
- ``oneshot``: :data:`METHODS` (magnitude, Wanda, SparseGPT) at :data:`SPARSITIES` (50%, 70%, 2:4),
  uniform per layer, on the managed weights (MiniLM: the encoder's 36 linear weights; Llama: the
  attention and MLP projections, not the head).
- ``recovery``: each pruned model trained for a fixed budget with its mask kept, per arm
  (:data:`ARMS`) and seed (:data:`SEEDS`). MiniLM: ``distill`` / ``distill_ham``, embedding
  distillation, :data:`MINILM_STEPS` steps of 32 calibration sentences, AdamW lr 1e-4.
  Llama: ``plain`` / ``ham`` (next-token loss) and ``distill`` / ``distill_ham`` (mixed with the KL
  to the dense logits, T = 2, w = 0.5), :data:`LLAMA_STEPS` steps of 4 training windows of 256
  tokens, AdamW lr 1e-4, no weight decay. HAM at its defaults (alpha 200, beta 1e-3, clamp 0.02):
  with AdamW at lr 1e-4 the mirror step is 0.02·|g| per step, far inside the clamp, so the
  defaults are HAM's own update, not a clipped one; they are kept for every cell.

A cell is named ``subject/method/sparsity/stage/arm/seed`` (:func:`cell_name`); every finished cell
appends one row to the CSV (flushed), and a run skips the cells the CSV already holds, so a killed
run resumes with the same command. Cells run grouped by (method, sparsity): one prune per group and
process. Subject code: :mod:`.pretrained_subjects`; the table: :mod:`.pretrained_table`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import fcntl
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparseham.analysis.cells import read_rows, source_commit
from sparseham.analysis.pretrained_table import ARMS, METHODS, SPARSITIES, write_table

__all__ = ["ARMS", "COLUMNS", "LLAMA_STEPS", "METHODS", "MINILM_STEPS", "SEEDS", "SPARSITIES", "Cell",
           "append", "cell_name", "grid", "main", "run"]

SEEDS = (0, 1, 2)
MINILM_STEPS = 25
LLAMA_STEPS = 40
STEPS = {"minilm": MINILM_STEPS, "llama": LLAMA_STEPS}
COLUMNS = ("name", "subject", "method", "sparsity", "stage", "arm", "ham", "distill", "seed", "steps",
           "cos_mean", "cos_worst", "perplexity", "loss_first", "loss_last", "seconds", "commit", "cpu",
           "threads", "finished")


@dataclass(frozen=True)
class Cell:
    """One row of the study: ``arm`` is ``none`` outside the recovery stage, ``seed`` -1 there."""

    subject: str
    method: str
    sparsity: str
    stage: str
    arm: str = "none"
    seed: int = -1

    @property
    def name(self) -> str:
        return cell_name(self)

    @property
    def ham(self) -> bool:
        return self.arm in ("ham", "distill_ham")

    @property
    def distill(self) -> bool:
        return self.arm.startswith("distill")


def cell_name(cell: Cell) -> str:
    """The stable identity of a cell in the CSV."""
    seed = "-" if cell.seed < 0 else f"s{cell.seed}"
    return f"{cell.subject}/{cell.method}/{cell.sparsity}/{cell.stage}/{cell.arm}/{seed}"


def grid(subject: str, *, methods: Sequence[str] = METHODS, sparsities: Sequence[str] = SPARSITIES,
         seeds: Sequence[int] = SEEDS) -> list[Cell]:
    """Every cell of ``subject``, grouped by (method, sparsity): one-shot first, then its recoveries."""
    if subject not in ARMS:
        raise ValueError(f"unknown subject {subject!r}; choose one of {', '.join(ARMS)}")
    cells = [Cell(subject, "dense", "0", "dense")] if subject == "llama" else []
    for method in methods:
        for sparsity in sparsities:
            cells.append(Cell(subject, method, sparsity, "oneshot"))
            cells += [Cell(subject, method, sparsity, "recovery", arm, seed)
                      for seed in seeds for arm in ARMS[subject]]
    return cells


def append(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV (header first when new), locked and flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
        f.flush()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(cell: Cell, values: dict, steps: int, seconds: float) -> dict:
    return {"name": cell.name, "subject": cell.subject, "method": cell.method, "sparsity": cell.sparsity,
            "stage": cell.stage, "arm": cell.arm, "ham": cell.ham, "distill": cell.distill,
            "seed": "" if cell.seed < 0 else cell.seed, "steps": steps, **values,
            "seconds": round(seconds, 1), "commit": source_commit(), "cpu": _cpu(),
            "threads": torch.get_num_threads(),
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def run(subject: str, csv_path: Path, load: Callable[[], object], *, cells: int | None = None,
        steps: int | None = None, todo: Sequence[Cell] | None = None, log=print) -> int:
    """Run the cells of ``subject`` (``todo``, default :func:`grid`) that ``csv_path`` lacks, at most
    ``cells`` of them; ``load()`` gives the subject (:mod:`.pretrained_subjects`), built only when a
    cell is left. Returns the number of cells run."""
    done = {r["name"] for r in read_rows(csv_path)}
    left = [c for c in (grid(subject) if todo is None else todo) if c.name not in done]
    if cells is not None:
        left = left[:cells]
    log(f"{subject}: {len(done)} rows in {csv_path}; running {len(left)} cells")
    if not left:
        return 0
    steps = STEPS[subject] if steps is None else steps
    target, pruned = load(), {}
    for cell in left:
        start = time.perf_counter()
        if cell.stage == "dense":
            values, used = target.measure(target.dense), 0
        else:
            key = (cell.method, cell.sparsity)
            if key not in pruned:
                pruned.clear()  # one pruned model held at a time
                pruned[key] = target.prune(cell.method, cell.sparsity)
            model, masks = pruned[key]
            if cell.stage == "oneshot":
                values, used = target.measure(model), 0
            else:
                student = copy.deepcopy(model)
                values = target.recover(student, masks, distill=cell.distill, ham=cell.ham, steps=steps,
                                        seed=cell.seed)
                values, used = {**values, **target.measure(student)}, steps
        append(csv_path, _row(cell, values, used, time.perf_counter() - start))
        log(f"{cell.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return len(left)


def _loader(subject: str, root: str) -> Callable[[], object]:
    from sparseham.analysis.pretrained_subjects import LlamaSubject, MiniLMSubject

    if subject == "minilm":
        return lambda: MiniLMSubject.load(root)
    if not Path(root, "llama_small/model/config.json").is_file():
        raise ValueError(f"{root}/llama_small/model is missing: build it first with "
                         f"`python -m sparseham.models.llama_small --root {root}`")
    return lambda: LlamaSubject.load(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseham.analysis.pretrained_study",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the cells the CSV lacks")
    r.add_argument("subject", choices=tuple(ARMS))
    r.add_argument("--csv", type=Path, required=True)
    r.add_argument("--cells", type=int, help="run at most N cells, then stop")
    r.add_argument("--root", default="data", help="the data folder (minilm/, llama_small/model/)")
    t = sub.add_parser("table", help="write table.md from the CSV")
    t.add_argument("csv", type=Path)
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "table":

        print(write_table(args.csv, args.out))
        return 0
    try:
        load = _loader(args.subject, args.root)
        if args.cells is not None and args.cells < 1:
            raise ValueError(f"--cells {args.cells}: expected >= 1")
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    run(args.subject, args.csv, load, cells=args.cells, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

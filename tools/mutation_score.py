"""Automatic mutation testing (cosmic-ray) of the library modules and plug-ins, scored by module.

    python tools/mutation_score.py [--only PATH ...] [--out DIR] [--timeout S] [--list]

``make mutation-score`` runs it (not part of ``make test``: hours on 2 cores). For each module of
:data:`MODULES`, cosmic-ray generates every mutant its operators produce (arithmetic and
comparison operators swapped, constants changed, conditions negated, ...) in a copy of the tree
laid out as the installed package (``tools/mutate.py``'s copy), runs that module's tests against
each one (``pytest -x``, compiled kernels run eagerly as in ``make test``), and records killed and
surviving mutants. The report, ``DIR/score.md``, gives the score by module; ``DIR/survivors.md``
lists each surviving mutant's diff, for a test or a note that it is equivalent. The hand-written
list of ``tools/mutations.yaml`` (``make mutate``) stays: it checks named bugs quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutate import _copy_tree, _where  # noqa: E402  (the installed-layout copy of the tree)

#: Module (repository path) -> the tests that check it.
MODULES = {
    "sparseham/ham.py": ["tests/test_ham.py"],
    "sparseham/_step/mirror.py": ["tests/test_ham.py", "tests/test_ham_exp.py"],
    "sparseham/_step/masking.py": ["tests/test_masks.py", "tests/test_methods.py"],
    "sparseham/_step/signflip.py": ["tests/test_tracking.py"],
    "sparseham/_step/one_pass.py": ["tests/test_fused_step.py"],
    "sparseham/masks.py": ["tests/test_masks.py", "tests/test_own_loop.py"],
    "sparseham/tracking.py": ["tests/test_tracking.py"],
    "sparseham/topk.py": ["tests/test_distributions.py", "tests/test_nm.py"],
    "sparseham/distributions.py": ["tests/test_distributions.py"],
    "sparseham/schedules.py": ["tests/test_methods.py"],
    "sparseham/sam.py": ["tests/test_sam.py"],
    "methods/rigl.py": ["tests/test_methods.py"],
    "methods/acdc.py": ["tests/test_methods.py"],
    "methods/gmp.py": ["tests/test_methods.py"],
    "methods/str.py": ["tests/test_methods.py", "tests/test_methods_e2e.py"],
    "methods/static.py": ["tests/test_static.py"],
    "methods/scoring.py": ["tests/test_static.py"],
}


def _config(module: Path, tests: list[str], timeout: float) -> str:
    command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider -p no:xdist {' '.join(tests)}"
    return (f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {timeout}\nexcluded-modules = []\n'
            f'test-command = "{command}"\n\n[cosmic-ray.distributor]\nname = "local"\n')


def score(path: str, tests: list[str], timeout: float) -> dict:
    """Run every mutant of ``path``; returns the counts and the surviving mutants' diffs."""
    cosmic = Path(sys.executable).parent / "cosmic-ray"
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        (tree / "cr.toml").write_text(_config(Path(_where(path)), tests, timeout))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(tree)}
        for step in (["init", "cr.toml", "s.sqlite"], ["exec", "cr.toml", "s.sqlite"]):
            subprocess.run([str(cosmic), *step], cwd=tree, env=env, check=True, capture_output=True)
        dump = subprocess.run([str(cosmic), "dump", "s.sqlite"], cwd=tree, env=env, check=True,
                              capture_output=True, text=True).stdout
    counts, survivors = {"killed": 0, "survived": 0, "incompetent": 0}, []
    for line in dump.splitlines():
        job, result = json.loads(line)
        outcome = (result or {}).get("test_outcome", "incompetent")
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "survived":
            survivors.append(result.get("diff", ""))
    return {**counts, "survivors": survivors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutation_score.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="these modules only (repository paths)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mutation")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    args = parser.parse_args(argv)
    chosen = {p: t for p, t in MODULES.items() if not args.only or p in args.only}
    if args.list or not chosen:
        print("\n".join(f"{p}: {' '.join(t)}" for p, t in MODULES.items()))
        return 0 if chosen else 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for path, tests in chosen.items():
        result = score(path, tests, args.timeout)
        total = result["killed"] + result["survived"]
        rate = result["killed"] / total if total else 1.0
        rows.append(f"| `{path}` | {total} | {result['killed']} | {result['survived']} | "
                    f"{result['incompetent']} | {rate:.1%} |")
        notes += [f"## `{path}`\n\n```diff\n{diff.strip()}\n```\n" for diff in result["survivors"]]
        print(rows[-1], flush=True)
    header = ["| module | mutants | killed | survived | incompetent | score |", "|---|---|---|---|---|---|"]
    (args.out / "score.md").write_text("\n".join(header + rows) + "\n")
    (args.out / "survivors.md").write_text("# Surviving mutants\n\n" + "\n".join(notes))
    print(f"wrote {args.out / 'score.md'} and {args.out / 'survivors.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mutation check: apply each deliberate one-line bug of ``tools/mutations.yaml`` to a copy of the
tree, run its tests, and report which bugs the tests caught (``make mutate``; not part of ``make test``).

    python tools/mutate.py [--only ID ...] [--list]

The copy is laid out as the installed package (``methods/`` inside ``sparseham/`` as
``sparseham.methods``, and so on), so every import in the tests and their subprocesses sees the
mutated code. Exit status: 0 when every mutation was caught, 1 when some survived, 2 for a
mutation whose ``find`` text is not in its file (the list went stale).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {"methods": "sparseham/methods", "analysis": "sparseham/analysis", "configs": "sparseham/configs"}


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in files.split():
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for folder, target in INSTALLED.items():
        shutil.copytree(dest / folder, dest / target, dirs_exist_ok=True)
    for data in ("data",):  # the fetched data sets, read-only
        if (ROOT / data).exists():
            (dest / data).symlink_to(ROOT / data)


def _where(rel: str) -> str:
    top, _, rest = rel.partition("/")
    return f"{INSTALLED[top]}/{rest}" if top in ("methods", "analysis") else rel


def run(mutation: dict, python: str) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        path = tree / _where(mutation["file"])
        text = path.read_text()
        if mutation["find"] not in text:
            return "STALE", 0.0
        path.write_text(text.replace(mutation["find"], mutation["replace"], 1))
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation["tests"]]
        proc = subprocess.run(argv,
                              cwd=tree, env=env, capture_output=True, text=True)
        return ("caught" if proc.returncode != 0 else "SURVIVED"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="run just these mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    mutations = yaml.safe_load((ROOT / "tools" / "mutations.yaml").read_text())
    if args.only:
        mutations = [m for m in mutations if m["id"] in args.only]
    if args.list:
        print("\n".join(f"{m['id']}: {m['file']}" for m in mutations))
        return 0
    results = []
    for m in mutations:
        outcome, seconds = run(m, sys.executable)
        results.append((m["id"], outcome))
        print(f"{m['id']:<34} {outcome:<9} {seconds:6.1f} s  ({', '.join(m['tests'])})", flush=True)
    caught = sum(o == "caught" for _, o in results)
    print(f"\n{caught} of {len(results)} mutations caught")
    if any(o == "STALE" for _, o in results):
        return 2
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Train a sparse model from a YAML config: ``python train.py --config FILE|NAME [--set k=v ...]``.

The same as ``sparseham train`` (see :mod:`sparseham.cli`), for use from a clone.
"""

import sys

from sparseham.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

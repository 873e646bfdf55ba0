"""What counts as a finished run's ``final.json``: the one rule that ``sparseham train`` (skip a
finished run), ``sparseham sweep`` (skip a finished cell) and the readers in ``analysis/`` (report a
damaged file) share, so that "damaged, re-run the same command to rewrite it" is what a re-run does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FINAL_FIELDS", "final_fields_problem", "final_problem"]

# The types of final.json's fields that readers compute with; the others are reported as they are.
FINAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("test_acc", "test_loss", "val_acc", "sparsity", "zero_fraction", "target", "epochs",
                     "wall_time_s", "lr", "ever_flipped_frac", "differs_from_init_frac"), (int, float)),
    **dict.fromkeys(("steps", "skipped_steps", "flips_masked", "flips_unmasked", "seed"), int),
    **dict.fromkeys(("ham", "layers", "config", "method_summary"), dict),
    **dict.fromkeys(("method", "model", "dataset", "optimizer"), str),
}
FINAL_KINDS = {(int, float): "a number", int: "a whole number", dict: "a mapping", str: "a string"}


def final_fields_problem(final: Any) -> str | None:
    """What makes a parsed ``final.json`` unusable: not an object, or a field of the wrong type
    (a number may be null: a non-finite value is written as null). ``None`` when it reads well."""
    if not isinstance(final, dict):
        return f"expected a JSON object, got {type(final).__name__}"
    for key, kinds in FINAL_FIELDS.items():
        value = final.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"'{key}' is {type(value).__name__}, expected {FINAL_KINDS[kinds]}"
    return None


def final_problem(path: Path) -> str | None:
    """Why ``path`` is not the record of a finished run (unreadable, not JSON, a field of the
    wrong type, no ``"finished": true``); ``None`` when it is. Re-running the same command
    rewrites such a file, and ``sparseham sweep`` runs its cell again."""
    try:
        final = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable: {(str(err).splitlines() or [type(err).__name__])[0][:120]}"
    problem = final_fields_problem(final)
    if problem is None and final.get("finished") is not True:
        problem = "no \"finished\": true"
    return problem

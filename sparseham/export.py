"""From a sparse run to a deployable model: ``sparseham export RUN --out FILE --format F``.

Formats (every file is a plain ``torch.save`` of tensors and strings, loadable with
``torch.load(path, weights_only=True)``; no sparseham class is pickled):

- ``dense``: the model's ``state_dict`` with the masks baked in (pruned weights exactly 0) and
  STR's reparametrization removed, its soft threshold applied: ``sign(w) * relu(|w| - sigmoid(s))``.
  It loads with ``load_state_dict(strict=True)`` into the original model class, with no sparseham
  import.
- ``masks``: ``{name: bool mask}`` of the managed tensors.
- ``sparse``: the dense state_dict with each managed tensor in torch's CSR layout with int32
  indices, a convolution kernel flattened to (out, in * kh * kw) first; :func:`load_sparse` turns
  it back into the dense state_dict. At density d a weight costs about 8d + 4/fan-in bytes here
  against 4 dense, so the file is smaller below about 50% density.
- ``hf``: for a run of an ``hf:`` language model, ``--out`` is a directory written by
  ``save_pretrained`` (safetensors), with the keys as the ``transformers`` model has them (no ``lm.``
  prefix), the masks baked in, the run's tokenizer beside it, and ``sparseham.json`` with the run's
  text settings (``sparseham.models.hf_io``). Plain ``from_pretrained`` loads it.

Writes are atomic (a temporary file or directory, then a rename), and the size and the compression ratio
against the dense file are returned and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FORMATS", "ExportError", "ExportWriteError", "dense_state", "export_run", "load_sparse", "main"]

FORMATS = ("dense", "masks", "sparse", "hf")
_ORIGINAL, _THRESHOLD = ".parametrizations.weight.original", ".parametrizations.weight.0.s"
# The files a run directory's owner writes and reads back (and its hidden temporary files).
_RUN_FILES = re.compile(r"config\.yaml|final\.json|metrics\.jsonl|signflips\.jsonl|checkpoint(-\d+)?\.pt|"
                        r"events\.out\.tfevents\..*|\..*")


class ExportError(ValueError):
    """A run that cannot be exported, or a bad ``--out``; the message is one line (exit status 2)."""


class ExportWriteError(ExportError):
    """The file system refused the export (full, read-only); the message is one line (exit status 1)."""


def dense_state(model: dict[str, Tensor], masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The plain state_dict: STR's latent weights and thresholds folded into ``<module>.weight``,
    and every tensor in ``masks`` multiplied by its mask."""
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        if key.endswith(_THRESHOLD):
            continue
        if key.endswith(_ORIGINAL):
            prefix = key[: -len(_ORIGINAL)]
            s = model[prefix + _THRESHOLD]
            key, value = f"{prefix}.weight", torch.sign(value) * torch.relu(value.abs() - torch.sigmoid(s))
        out[key] = value.detach().clone()
    for name, mask in (masks or {}).items():
        out[name] = out[name] * mask.to(out[name].dtype)
    return out


def _to_sparse(t: Tensor) -> Tensor:
    csr = t.reshape(t.shape[0], -1).to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)


def load_sparse(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state_dict of a ``sparse`` export."""
    state = torch.load(path, weights_only=True)
    shapes = state["shapes"]
    return {k: (v.to_dense().view(shapes[k]) if k in shapes else v) for k, v in state["tensors"].items()}


def _serialized(obj) -> memoryview:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _write_atomic(obj, out: Path) -> int:
    """Serializes in memory first, so that a full disk is an ``OSError`` naming its cause
    (``torch.save`` to a file reports it as a bare RuntimeError), and the old ``out`` stays whole."""
    data, tmp = _serialized(obj), out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only directory refuses even this
            tmp.unlink(missing_ok=True)
        raise ExportWriteError(f"cannot write {out}: {e.strerror or e}; free disk space or choose a "
                               "writable --out") from None
    return out.stat().st_size


def _check_out(run: Path, raw: str, *, directory: bool = False) -> Path:
    """``raw`` as a path, once it is known to name a file (or for ``directory``, a folder) that is not
    one of the run's own."""
    out = Path(raw)
    if not raw or raw.endswith(os.sep) or out.name in ("", ".", ".."):
        raise ExportError(f"--out {raw!r} names no file; give the file to write, e.g. --out model.pt")
    if out.is_dir() and not directory:
        raise ExportError(f"--out {out} is a directory; give a file in it, e.g. --out {out / 'model.pt'}")
    target = out.resolve()
    if target.parent == run.resolve() and _RUN_FILES.fullmatch(target.name):
        raise ExportError(f"--out {out} is the run's own {target.name}; write the export elsewhere, "
                          f"e.g. --out {run / 'export.pt'}")
    return out


def _export_hf(run: Path, state: dict, dense: dict[str, Tensor], out: Path) -> int:
    """Write the ``hf`` format (see the module docstring); returns the directory's size in bytes."""
    from sparseham.config import ConfigError, load_config
    from sparseham.data import DataError
    from sparseham.models.hf_io import causal_lm_from_state, save_pretrained
    from sparseham.train.build import text_options

    try:
        cfg = load_config(run / "config.yaml")
        if not cfg.model.name.startswith("hf:"):
            raise ExportError(f"{run} trained {cfg.model.name}; format hf needs an hf: language model "
                              "(use dense, masks or sparse)")
        text = text_options(cfg)
        model = causal_lm_from_state(cfg.model.name.removeprefix("hf:"), dense, options=cfg.model.hf,
                                     pretrained=cfg.model.pretrained)
        metadata = {"format": "sparseham.hf/1", "run": str(run.resolve()), "step": state.get("step"),
                    "val_split": cfg.data.val_split, "text": {**text, "tokenizer": "auto"}}
        save_pretrained(model, out, tokenizer=text["tokenizer"], metadata=metadata)
    except (ConfigError, DataError, ValueError) as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def export_run(run: str | os.PathLike, out: str | os.PathLike, fmt: str = "dense") -> dict[str, float]:
    """Export the newest good checkpoint of run directory ``run`` to ``out`` in format ``fmt``.

    Returns:
        ``{"bytes", "dense_bytes", "ratio"}``: the file's size, the dense export's size, and
        dense / file.

    Raises:
        ExportError: not a run directory, no readable checkpoint, an unknown format, or an
            ``out`` that names no file or one of the run's own files.
        ExportWriteError: the file system refused to write ``out``; an old ``out`` stays whole.
    """
    from sparseham.train.checkpoint import CheckpointError, latest_good_checkpoint

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a run directory (no config.yaml)")
    out = _check_out(run, os.fspath(out), directory=fmt == "hf")
    try:
        _, state, _ = latest_good_checkpoint(run)
    except (CheckpointError, FileNotFoundError) as e:
        raise ExportError(f"{run}: no readable checkpoint ({e})") from None
    manager = state.get("manager") or {}
    names, stored = manager.get("names") or [], manager.get("masks")
    masks = dict(zip(names, stored)) if stored is not None else None
    dense = dense_state(state["model"], masks)
    if fmt == "hf":
        size = _export_hf(run, state, dense, out)
        dense_bytes = len(_serialized(dense))
        return {"bytes": size, "dense_bytes": dense_bytes, "ratio": dense_bytes / size}
    if fmt == "dense":
        payload = dense
    elif fmt == "masks":
        payload = masks or {n: dense[n] != 0 for n in names}
    else:
        payload = {"format": "sparseham.sparse/1", "shapes": {n: list(dense[n].shape) for n in names},
                   "tensors": {k: (_to_sparse(v) if k in names else v) for k, v in dense.items()}}
    size = _write_atomic(payload, out)
    dense_bytes = len(_serialized(dense))
    return {"bytes": size, "dense_bytes": dense_bytes, "ratio": dense_bytes / size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparseham export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run directory written by sparseham train")
    parser.add_argument("--out", required=True, help="the file to write (format hf: a new directory)")
    parser.add_argument("--format", default="dense", help=f"one of {', '.join(FORMATS)} (default dense)")
    args = parser.parse_args(argv)
    if args.format == "hf":
        from sparseham.models.hf import quiet_progress_bars

        quiet_progress_bars()
    try:
        stats = export_run(args.run, args.out, args.format)
    except ExportError as e:
        print(f"sparseham export: {e}", file=sys.stderr)
        return 1 if isinstance(e, ExportWriteError) else 2
    if args.format == "hf":
        print(f"wrote {args.out} (hf): a save_pretrained directory of {stats['bytes']:,} bytes")
        return 0
    print(f"wrote {args.out} ({args.format}): {stats['bytes']:,} bytes, {stats['ratio']:.2f}x smaller than "
          f"the dense export ({stats['dense_bytes']:,} bytes)")
    return 0

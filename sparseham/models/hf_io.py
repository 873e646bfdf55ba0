"""Hugging Face format in and out: a run's causal LM as a ``save_pretrained`` directory, and such a
directory back as a :class:`~sparseham.models.hf.CausalLM`.

A run's checkpoint holds the :class:`~sparseham.models.hf.CausalLM` wrapper's state_dict, whose
keys carry the wrapper's ``lm.`` prefix; :func:`causal_lm_from_state` rebuilds the ``transformers``
model (from ``model.pretrained``'s config, or from ``model.hf`` with the vocabulary read off the
checkpoint's embedding) and loads the keys without the prefix. :func:`save_pretrained` writes it with
``save_pretrained`` (safetensors), the tokenizer beside it when the run had one, and
:data:`METADATA` (``sparseham.json``: the text settings of the run, so that ``sparseham eval DIR``
holds out the same text). Plain ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparseham.models.hf import CausalLM, causal_lm_class, check_model_dir, lm_config

__all__ = ["METADATA", "PREFIX", "causal_lm_from_state", "load_causal_lm", "read_metadata", "save_pretrained"]

#: The file of a save_pretrained directory that says how sparseham made it.
METADATA = "sparseham.json"
#: The prefix of :class:`CausalLM`'s state_dict keys.
PREFIX = "lm."
_CAUSAL = ("ForCausalLM", "LMHeadModel")


def _embedding_key(cls: type, config) -> str:
    """The state_dict key of the input embedding, found on a skeleton that allocates nothing."""
    with torch.device("meta"):
        skeleton = cls(config)
    weight = skeleton.get_input_embeddings().weight
    return next(name for name, p in skeleton.named_parameters() if p is weight)


def causal_lm_from_state(architecture: str, state: dict[str, Tensor], *,
                         options: dict[str, Any] | None = None, pretrained: str | None = None) -> CausalLM:
    """The :class:`CausalLM` whose state_dict is ``state`` (a checkpoint's ``model``).

    Args:
        architecture: the ``transformers`` class name (``model.name`` without ``hf:``).
        options: ``model.hf`` of an untrained model.
        pretrained: ``model.pretrained``; its ``config.json`` is the model's config.

    Raises:
        ValueError: ``pretrained`` is not a model directory, or ``state`` does not fit the model.
    """
    cls = causal_lm_class(architecture)
    if pretrained:
        check_model_dir(pretrained)
        config = cls.config_class.from_pretrained(str(Path(pretrained).expanduser()), local_files_only=True)
    else:
        config = lm_config(cls, options, vocab_size=1)
        key = PREFIX + _embedding_key(cls, config)
        if key not in state:
            raise ValueError(f"the checkpoint has no {key}; it is not a {architecture}")
        config = lm_config(cls, options, vocab_size=state[key].shape[0])
    model = CausalLM(cls(config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint does not fit {architecture}: {str(err).splitlines()[0]}") from None
    return model


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
        raise ValueError(f"--out {out} exists; give a new directory (or an empty one)")
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"--out {str(out)!r} names no directory; give a new directory")


def save_pretrained(model: CausalLM, out: str | os.PathLike, *, tokenizer: str | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``save_pretrained`` directory ``out``, atomically.

    Everything is written into a hidden sibling first and renamed last, so an interrupted or failed
    write leaves no half-written ``out``.

    Args:
        tokenizer: a directory whose tokenizer is saved beside the weights.
        metadata: written as :data:`METADATA`.

    Raises:
        ValueError: ``out`` exists and is not an empty directory.
        OSError: the directory cannot be written (the partial copy is removed).
    """
    from sparseham.data.text import load_tokenizer

    out = Path(out)
    _check_out(out)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.lm.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / METADATA).write_text(json.dumps(metadata or {}, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_metadata(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The :data:`METADATA` of ``model_dir``, ``{}`` when it has none or it is not a JSON object."""
    try:
        data = json.loads((Path(model_dir) / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_causal_lm(model_dir: str | os.PathLike, key: str = "model") -> CausalLM:
    """The causal LM of a ``save_pretrained`` directory, through ``AutoModelForCausalLM``.

    Raises:
        ValueError: not a model directory, or not a causal LM (the message names ``key``).
    """
    from transformers import AutoModelForCausalLM

    config = check_model_dir(model_dir, key)
    kind = config.get("architectures") or [config.get("model_type")]
    # transformers would put a fresh LM head on an encoder (BERT loads as BertLMHeadModel): refuse it.
    causal = not config.get("architectures") or any(str(k).endswith(_CAUSAL) for k in kind)
    why = None if causal else "not an architecture *ForCausalLM or *LMHeadModel"
    if why is None:
        try:
            return CausalLM(AutoModelForCausalLM.from_pretrained(str(Path(model_dir).expanduser()),
                                                                 local_files_only=True))
        except (OSError, ValueError, KeyError) as err:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    raise ValueError(f"{key} = {str(model_dir)!r} holds {kind[0]}, which does not load as a causal LM "
                     f"({why})")

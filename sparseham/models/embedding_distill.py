"""Recovery of a pruned sentence encoder by distilling the dense model's embeddings, mask kept.

The student is the pruned encoder; the targets are the dense model's sentence embeddings of
unlabeled sentences (the calibration half of :func:`~sparseham.data.sentences.sentence_split`),
computed once. The loss is ``1 - cos(student, dense)`` averaged over a batch: the subject's metric
itself (:func:`~sparseham.models.minilm.embedding_cosine`), and on normalized embeddings it is half
their squared distance, so it is also the MSE objective up to a factor. The forward pass runs in eval
mode (no dropout): the student is asked to reproduce the deterministic dense embedding.

The mask is static: a :class:`~sparseham.MaskManager` over the encoder's linear weights keeps the
given masks (by default the zeros the model already has) through every step, with the base
optimizer alone or wrapped in :class:`~sparseham.HAM`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparseham import HAM, MaskManager
from sparseham.models.minilm import embed

__all__ = ["distill_embeddings", "encoder_weights"]


def encoder_weights(model: nn.Module) -> list[str]:
    """The names of the linear weights of a BERT encoder's layers (attention and MLP); not the
    embeddings, the norms or the pooler, which mean-pooled embeddings do not use."""
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("encoder.")]


def _optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
               ham: Mapping[str, Any] | None) -> torch.optim.Optimizer:
    if name == "adamw":
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif name == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer = {name!r}; expected adamw or sgd")
    return HAM(base, **ham) if ham is not None else base


def distill_embeddings(student: nn.Module, tokenizer, sentences: Sequence[str], targets: Tensor, *,
                       steps: int, batch_size: int = 32, lr: float = 1e-4, optimizer: str = "adamw",
                       weight_decay: float = 0.0, ham: Mapping[str, Any] | None = None,
                       masks: Mapping[str, Tensor] | None = None,
                       seed: int = 0) -> tuple[Tensor, MaskManager]:
    """Train ``student`` in place for ``steps`` steps towards the embeddings ``targets`` of ``sentences``.

    Args:
        targets: ``(len(sentences), D)`` normalized dense embeddings.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9), at ``lr`` with ``weight_decay``.
        ham: keyword arguments of :class:`~sparseham.HAM` (``{}`` for its defaults), or None for
            the base optimizer alone.
        masks: weight name -> bool mask of the weights kept; default: the nonzeros of
            :func:`encoder_weights`.
        seed: the order of the sentences (a seeded permutation per pass).

    Returns:
        ``(losses, manager)``: the loss of every step (one device tensor, read once at the end by
        the caller) and the :class:`~sparseham.MaskManager` that kept the masks.

    Raises:
        ValueError: no steps, no sentences, targets of another length, an unknown optimizer, or
            masks that name no weight of the model.
    """
    from sparseham import methods

    if steps < 1 or not sentences or len(targets) != len(sentences):
        raise ValueError(f"distill_embeddings needs steps >= 1 and one target per sentence; got steps = "
                         f"{steps}, {len(sentences)} sentences and {len(targets)} targets")
    params = dict(student.named_parameters())
    masks = dict(masks) if masks is not None else {n: params[n] != 0 for n in encoder_weights(student)}
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name {unknown[0]!r}, which is not a parameter of the model")
    opt = _optimizer(student, optimizer, lr, weight_decay, ham)
    # A static method at target 0 builds all-ones masks; set_masks then installs the given ones.
    manager = MaskManager(student, opt, methods.get("static")(0.0), include=list(masks))
    given = [masks[n].to(torch.bool) for n in manager.names]
    manager.set_masks(given, expected=[int(m.sum()) for m in given])
    generator = torch.Generator().manual_seed(seed)
    order, losses = torch.empty(0, dtype=torch.int64), []
    targets = targets.to(next(student.parameters()).device)
    student.eval()
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(sentences), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        emb = embed(student, tokenizer, [sentences[i] for i in index.tolist()], batch_size=batch_size)
        loss = (1 - (emb * targets[index]).sum(1)).mean()
        loss.backward()
        manager.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), manager

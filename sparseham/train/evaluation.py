"""Evaluation passes: summed loss and accuracy over whole splits, read back once per split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loaders: dict, device: torch.device, amp: torch.dtype | None = None):
    """Mean loss and accuracy of ``model`` on each split in ``loaders`` (``None`` loaders are skipped),
    per target: per sample for a classifier, per token for a language model.

    Returns:
        split -> ``(loss, accuracy)``. The model is put back into training mode afterwards.
    """
    model.eval()
    out = {}
    for split, loader in loaders.items():
        if loader is None or loader.num_samples == 0:
            continue  # an empty split has no loss and no accuracy
        loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        targets = 0
        for x, y in loader.epoch(0):
            targets += y.numel()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        out[split] = (loss.item() / targets, correct.item() / targets)
    model.train()
    return out

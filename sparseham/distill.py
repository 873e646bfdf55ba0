"""Knowledge distillation from a dense teacher: a pruned student matches the teacher's softened logits.

Following Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network", eq. 2 and
the remark after it: both models' logits are softened by a temperature T, the student is pulled
towards the teacher by the Kullback-Leibler divergence of the softened distributions, scaled by T²
so that its gradients keep their size when T changes, and that term is mixed with the task loss::

    loss = (1 - w) * task_loss + w * T² * mean_rows KL(softmax(t / T) || softmax(s / T))

A row is one prediction: a sample of a classifier, a token position of a language model (rows
where ``mask`` is False, e.g. padding, do not count). ``sparseham train`` uses it with
``distill.enabled`` (the teacher is the model as loaded, before pruning), and
:class:`~sparseham.integrations.hf.SparseTrainer` with ``teacher=``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "kl_to_teacher"]


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  mask: Tensor | None = None) -> Tensor:
    """``T² · KL(softmax(teacher / T) || softmax(student / T))``, averaged over the rows.

    Args:
        student_logits, teacher_logits: ``(..., classes)`` of the same shape; the teacher's carry
            no gradient.
        mask: bool ``(...)``: the rows that count; None for all.

    Returns:
        A scalar, computed in float32 at least.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}; expected > 0")
    dtype = student_logits.dtype if student_logits.dtype.itemsize >= 4 else None
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).to(dtype)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1).to(dtype)
    rows = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if mask is None:
        kl = rows.mean()
    else:
        weights = mask.to(rows.dtype)
        kl = (rows * weights).sum() / weights.sum().clamp(min=1)
    return kl * temperature**2


def distillation_loss(task_loss: Tensor, student_logits: Tensor, teacher_logits: Tensor, *,
                      temperature: float, weight: float, mask: Tensor | None = None) -> Tensor:
    """``(1 - weight) * task_loss + weight * kl_to_teacher(...)`` (see the module docstring).

    Raises:
        ValueError: ``weight`` outside [0, 1], ``temperature`` not > 0, or logits of two shapes.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight = {weight}; expected a mixing weight in [0, 1]")
    kl = kl_to_teacher(student_logits, teacher_logits, temperature, mask)
    return (1.0 - weight) * task_loss + weight * kl

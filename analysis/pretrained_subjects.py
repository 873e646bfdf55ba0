"""The two pretrained subjects of the one-shot pruning study (:mod:`.pretrained_study`), as objects
that prune, measure and recover: :class:`MiniLMSubject` and :class:`LlamaSubject`.

A subject holds the dense model and its data, computed once per process. :meth:`prune` returns a
pruned copy and its keep masks (:func:`sparseham.oneshot.prune`, uniform per-layer sparsity as the
references); :meth:`measure` gives the metric columns of a row; :meth:`recover` trains a pruned copy
in place with the masks kept by a static :class:`~sparseham.MaskManager`, with AdamW alone or
wrapped in :class:`~sparseham.HAM` at its defaults.

- **MiniLM** (``subject = minilm``): metric ``cos_mean`` / ``cos_worst``, the held-out embedding
  cosine to the dense model (:func:`sparseham.models.minilm.embedding_cosine`); calibration: each
  sentence of the calibration half as its own batch (no padding, so no pad token enters Wanda's norms
  or SparseGPT's Hessian); recovery: embedding distillation on the calibration half
  (:func:`sparseham.models.embedding_distill.distill_embeddings`).
- **Llama** (``subject = llama``): metric ``perplexity`` on the test windows of the subject's text
  (:func:`sparseham.train.evaluate_run.evaluate_lm`, as ``sparseham eval``); calibration: the first
  :data:`LLAMA_CALIB` training windows; recovery: next-token loss on the training windows after them
  (``plain``), or that loss mixed with the KL to the dense model's logits (``distill``,
  :func:`sparseham.distill.distillation_loss` at the app's defaults T = 2, w = 0.5).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparseham import HAM, MaskManager, methods
from sparseham.distill import distillation_loss
from sparseham.oneshot import prune

__all__ = ["LLAMA_CALIB", "LlamaSubject", "MiniLMSubject", "Subject", "pattern_of"]

#: Calibration windows of the Llama subject (``sparseham prune``'s default ``--nsamples``).
LLAMA_CALIB = 32


def pattern_of(sparsity: str) -> tuple[float, tuple[int, int] | None]:
    """``"0.5"`` -> ``(0.5, None)``; ``"2:4"`` -> ``(0.5, (2, 4))``."""
    if ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        return 1 - n / m, (n, m)
    return float(sparsity), None


class Subject:
    """What both subjects share: the dense model, the managed weight names, pruning a copy."""

    name = ""
    metrics: tuple[str, ...] = ()

    def __init__(self, dense: nn.Module, managed: Sequence[str], calibration: Sequence) -> None:
        self.dense, self.managed, self.calibration = dense.eval(), list(managed), list(calibration)

    def prune(self, method: str, sparsity: str) -> tuple[nn.Module, dict[str, Tensor]]:
        """A pruned copy of the dense model and its keep masks (weight name -> bool)."""
        model = copy.deepcopy(self.dense)
        fraction, pattern = pattern_of(sparsity)
        params = [(n, model.get_parameter(n)) for n in self.managed]
        result = prune(model, self.calibration, method=method, sparsity=fraction, pattern=pattern,
                       params=params)
        return model, dict(zip(result.names, result.masks))

    def measure(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def recover(self, model: nn.Module, masks: dict[str, Tensor], *, distill: bool, ham: bool, steps: int,
                seed: int) -> dict[str, float]:
        raise NotImplementedError


def _check_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Every pruned weight is still exactly zero (a study row must not come from a leaked mask)."""
    for name, mask in masks.items():
        if model.get_parameter(name).detach()[~mask].count_nonzero() != 0:
            raise RuntimeError(f"{name}: a pruned weight is nonzero after recovery")


class MiniLMSubject(Subject):
    """The MiniLM sentence encoder; ``sentences`` = (calibration half, held-out half)."""

    name = "minilm"
    metrics = ("cos_mean", "cos_worst")

    def __init__(self, dense: nn.Module, tokenizer, calibration: Sequence[str], held_out: Sequence[str], *,
                 lr: float = 1e-4, batch_size: int = 32) -> None:
        from sparseham.models.embedding_distill import encoder_weights
        from sparseham.models.minilm import embed

        batches = [dict(tokenizer([s], return_tensors="pt")) for s in calibration]
        super().__init__(dense, encoder_weights(dense), batches)
        self.tokenizer, self.sentences, self.held_out = tokenizer, list(calibration), list(held_out)
        self.lr, self.batch_size = lr, batch_size
        with torch.no_grad():
            self.reference = embed(dense, tokenizer, held_out)
            self.targets = embed(dense, tokenizer, calibration)

    @classmethod
    def load(cls, root: str = "data", sentences: int = 1024) -> MiniLMSubject:
        from sparseham.data.sentences import sentence_split
        from sparseham.models.minilm import load_minilm, minilm_dir

        calibration, held_out = sentence_split(sentences)
        return cls(*load_minilm(minilm_dir(root)), calibration, held_out)

    def measure(self, model: nn.Module) -> dict[str, float]:
        from sparseham.models.minilm import embed, embedding_cosine

        with torch.no_grad():
            cos = embedding_cosine(embed(model, self.tokenizer, self.held_out), self.reference)
        return {"cos_mean": cos["mean"], "cos_worst": cos["worst"]}

    def recover(self, model, masks, *, distill, ham, steps, seed):
        from sparseham.models.embedding_distill import distill_embeddings

        if not distill:
            raise ValueError("the MiniLM subject recovers by distillation only (arms distill, distill_ham)")
        losses, _ = distill_embeddings(model, self.tokenizer, self.sentences, self.targets, steps=steps,
                                       batch_size=self.batch_size, lr=self.lr, ham={} if ham else None,
                                       masks=masks, seed=seed)
        _check_masks(model, masks)
        return {"loss_first": float(losses[0]), "loss_last": float(losses[-1])}


class LlamaSubject(Subject):
    """A causal LM (:class:`~sparseham.models.hf.CausalLM`) with training and test windows
    ``(N, seq_len + 1)``."""

    name = "llama"
    metrics = ("perplexity",)

    def __init__(self, dense: nn.Module, train: Tensor, test: Tensor, *, calib: int = LLAMA_CALIB,
                 lr: float = 1e-4, batch_size: int = 4, temperature: float = 2.0,
                 weight: float = 0.5) -> None:
        if len(train) <= calib:
            raise ValueError(f"{len(train)} training windows: need more than the {calib} that calibrate")
        super().__init__(dense, dense.default_managed, [w[None, :-1] for w in train[:calib]])
        self.train, self.test = train[calib:], test
        self.lr, self.batch_size, self.temperature, self.weight = lr, batch_size, temperature, weight

    @classmethod
    def load(cls, root: str = "data") -> LlamaSubject:
        from sparseham.models.hf_io import load_causal_lm
        from sparseham.train.evaluate_run import held_out_windows

        model_dir = f"{root}/llama_small/model"
        train = held_out_windows(model_dir, split="train")
        return cls(load_causal_lm(model_dir), train, held_out_windows(model_dir, split="test"))

    def measure(self, model: nn.Module) -> dict[str, float]:
        from sparseham.train.evaluate_run import evaluate_lm

        with torch.no_grad():
            return {"perplexity": evaluate_lm(model.eval(), self.test)["perplexity"]}

    def recover(self, model, masks, *, distill, ham, steps, seed):
        base = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        opt = HAM(base) if ham else base
        # A static method at target 0 builds all-ones masks; set_masks installs the pruned ones.
        manager = MaskManager(model, opt, methods.get("static")(0.0), include=list(masks))
        given = [masks[n].to(torch.bool) for n in manager.names]
        manager.set_masks(given, expected=[int(m.sum()) for m in given])
        generator = torch.Generator().manual_seed(seed)
        order, losses = torch.empty(0, dtype=torch.int64), []
        model.eval()  # no dropout in Llama; eval mode keeps train and measure identical
        for _ in range(steps):
            if len(order) < self.batch_size:
                order = torch.cat([order, torch.randperm(len(self.train), generator=generator)])
            rows, order = self.train[order[:self.batch_size]], order[self.batch_size:]
            inputs, targets = rows[:, :-1], rows[:, 1:].reshape(-1)
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, targets)
            if distill:
                with torch.no_grad():
                    teacher = self.dense(inputs)
                loss = distillation_loss(loss, logits, teacher, temperature=self.temperature,
                                         weight=self.weight)
            loss.backward()
            manager.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        _check_masks(model, masks)
        return {"loss_first": float(losses[0]), "loss_last": float(losses[-1])}

"""Build the training objects from a validated config: optimizer (+HAM), LR schedule, method, tracker."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sparseham import method as method_registry
from sparseham.config import Config, config_to_dict, method_options
from sparseham.data import Data, build_data
from sparseham.data.text import check_byte_vocabulary, resolve_tokenizer
from sparseham.ham import HAM
from sparseham.models import build_causal_lm, build_model
from sparseham.models.hf import check_pretrained, quiet_progress_bars
from sparseham.sam import SAM
from sparseham.tracking import SignFlipTracker

__all__ = [
    "build_data_and_model",
    "build_optimizer",
    "build_scheduler",
    "build_method",
    "build_teacher",
    "build_tracker",
    "resolve_device",
    "text_options",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r}, but no CUDA device is available; use auto or cpu")
    return device


def text_options(cfg: Config) -> dict:
    """``data.text`` with its tokenizer resolved to a directory or None (bytes).

    Raises:
        DataError: a tokenizer directory without a tokenizer, or byte-level text for a pretrained
            model whose vocabulary is not 256.
        ValueError: ``model.pretrained`` is not a model directory.
    """
    options = config_to_dict(cfg)["data"]["text"]
    pretrained = cfg.model.pretrained if cfg.model.name.startswith("hf:") else None
    if pretrained:
        check_pretrained(cfg.model.name.removeprefix("hf:"), pretrained)
    setting = options["tokenizer"]
    options["tokenizer"] = resolve_tokenizer(setting, pretrained)
    if pretrained and options["tokenizer"] is None:
        check_byte_vocabulary(pretrained, "data.text.tokenizer = bytes" if setting == "bytes" else
                              "it holds no tokenizer")
    return options


def build_data_and_model(cfg: Config, d, device: torch.device) -> tuple[Data, nn.Module]:
    """The loaders (sharded for this rank) and the model, sized to the data set, on ``device``."""
    c = cfg.data
    data = build_data(
        c.dataset,
        root=c.root,
        batch_size=c.batch_size,
        seed=cfg.experiment.seed,
        num_workers=c.num_workers,
        download=c.download,
        val_split=c.val_split,
        rank=d.rank,
        world_size=d.world_size,
        synthetic=config_to_dict(cfg)["data"]["synthetic"],
        eval_batch_size=c.eval_batch_size,
        text=text_options(cfg) if c.dataset == "text" else None,
    )
    info = data.info
    if cfg.model.name.startswith("hf:"):
        quiet_progress_bars()  # the run's own progress line says how far it is
        model = build_causal_lm(cfg.model.name.removeprefix("hf:"), vocab_size=info.num_classes,
                                seq_len=info.seq_len, options=cfg.model.hf, pretrained=cfg.model.pretrained)
    else:
        model = build_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                            image_size=info.image_size)
    return data, model.to(device)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over all parameters, wrapped in :class:`HAM` when ``ham.enabled``."""
    o = cfg.optim
    params = model.parameters()
    if o.name == "sgd":
        opt = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.sam.rho is not None:
        opt = SAM(opt, o.sam.rho, adaptive=o.sam.adaptive)
    h = cfg.ham
    if not h.enabled:
        return opt
    return HAM(
        opt,
        h.alpha,
        h.beta,
        sign=h.sign,
        clamp=h.clamp,
        max_norm=h.max_norm,
        min_ndim=h.min_ndim,
        fused=None if h.fused == "auto" else h.fused,
        # at least one counted step in every log interval
        diagnostics=min(h.diagnostics, cfg.logging.log_every),
        sam_gradient=h.sam_gradient,
    )


def lr_factor(step: int, *, total: int, warmup: int, name: str, milestones, gamma: float) -> float:
    """The multiplier of the base lr at ``step``: linear warm-up, then cosine, step or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return gamma ** sum(step >= m * total for m in milestones)


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, total: int, steps_per_epoch: int):
    """A per-iteration ``LambdaLR`` following ``optim.schedule``."""
    s = cfg.optim.schedule
    warmup = round(s.warmup_epochs * steps_per_epoch)
    kwargs = {
        "total": total,
        "warmup": warmup,
        "name": s.name,
        "milestones": tuple(s.milestones),
        "gamma": s.gamma,
    }
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **kwargs))


def build_method(cfg: Config) -> method_registry.Method:
    """The configured sparsification method, with its own section's options."""
    sp = cfg.sparsity
    cls = method_registry.get(sp.method)
    kwargs = {"distribution": sp.distribution, "dense_layers": tuple(sp.dense_layers), "init": sp.init,
              "layer_density": dict(sp.layer_density), "pattern": sp.pattern}
    return cls(sp.target or 0.0, **kwargs, **method_options(cfg))


def build_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode, for distillation."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def build_tracker(cfg: Config) -> SignFlipTracker | None:
    t = cfg.tracking
    if not t.sign_flips:
        return None
    return SignFlipTracker(interval=t.interval, per_weight=t.per_weight, fused=t.fused)

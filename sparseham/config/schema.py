"""The typed sections of the YAML config, validated on construction.

Each section is a :class:`~sparseham.config.fields.Section` dataclass: ``__post_init__``
converts every field to its annotated type, checks the range in the field's metadata and then
the relations between fields. Every field carries ``metadata["help"]``. Loading, merging and
``--set`` overrides live in :mod:`sparseham.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from sparseham import method as _method
from sparseham.config.fields import FieldError, Section, hints, range_text
from sparseham.config.fields import field as _f

__all__ = [
    "DENSE", "ExperimentConfig", "SyntheticConfig", "TextConfig", "DataConfig", "ModelConfig",
    "ScheduleConfig", "OptimConfig", "HamConfig", "SparsityConfig", "TrackingConfig", "TrainConfig",
    "LoggingConfig", "CheckpointConfig", "DistillConfig", "Config", "help_text",
]

#: The method that keeps every weight; it alone needs no ``sparsity.target``.
DENSE = "dense"
_DEFAULT_INITS = ("random",)


def _unknown(what: str, value: str, known: Sequence[str], extra: str = "") -> str:
    hint = _method.suggest(value, known)
    return f"unknown {what}{hint} (known: {', '.join(known) or 'none'}{extra})"


@dataclass
class ExperimentConfig(Section):
    name: str = _f("run", "name of the run; the run directory is <out_dir>/<name> "
                          "unless --out is given")
    seed: int = _f(0, "random seed for weights, data order, masks and the validation split", ge=0,
                   lt=2**63)
    out_dir: str = _f("runs", "parent directory of run directories")

    def _check_relations(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise FieldError.bad("name", self.name, "a run name is one plain directory name (no '/', "
                                 "no '..'); use experiment.out_dir or --out for the location")


@dataclass
class SyntheticConfig(Section):
    channels: int = _f(1, "image channels of the synthetic data set", gt=0)
    size: int = _f(16, "image height and width in pixels", gt=0)
    classes: int = _f(10, "number of classes", gt=0)
    train_size: int = _f(2048, "number of training images", gt=0)
    test_size: int = _f(512, "number of test images", gt=0)
    noise: float = _f(1.0, "standard deviation of the noise around each class template", ge=0)


@dataclass
class TextConfig(Section):
    source: str = _f("stdlib", "the text: 'stdlib' (this Python's own standard-library .py sources) or a "
                               "file, folder or glob of local text files")
    seq_len: int = _f(128, "tokens per training sequence (bytes, or the tokenizer's tokens)", gt=0)
    max_bytes: int = _f(4_000_000, "read at most this many bytes of the corpus, files in sorted order", gt=0)
    test_fraction: float = _f(0.05, "fraction of the sequences, at the end of the corpus, held out for test",
                              gt=0, lt=1)
    tokenizer: str = _f("auto", "auto: model.pretrained's own tokenizer when it has one, else bytes; bytes "
                                "(UTF-8, 256 tokens); or a directory holding a transformers tokenizer")

    def _check_relations(self) -> None:
        if not self.tokenizer.strip():
            raise FieldError.bad("tokenizer", self.tokenizer, "expected auto, bytes or a tokenizer directory")


@dataclass
class DataConfig(Section):
    dataset: str = _f("fashion_mnist", "data set name (see sparseham.data.DATASETS)")
    root: str = _f("data", "directory that holds (or receives) the data set files")
    batch_size: int = _f(128, "training mini-batch size", gt=0)
    eval_batch_size: int = _f(1000, "batch size for validation and test passes", gt=0)
    num_workers: int = _f(0, "DataLoader worker processes (0 loads in the main process)", ge=0)
    download: bool = _f(False, "download the data set if it is missing under root")
    val_split: float = _f(0.0, "fraction of the training set held out for validation", ge=0, lt=1)
    synthetic: SyntheticConfig = _f(
        factory=SyntheticConfig, doc="shape of the generated data when dataset is synthetic")
    text: TextConfig = _f(factory=TextConfig, doc="the corpus and sequence length when dataset is text")

    def _check_relations(self) -> None:
        from sparseham.data import DATASETS  # imported late: data.py pulls in torchvision

        if self.dataset not in DATASETS:
            reason = _unknown("dataset", self.dataset, DATASETS)
            raise FieldError.bad("dataset", self.dataset, reason)


@dataclass
class ModelConfig(Section):
    name: str = _f("lenet5", "a name in sparseham.models.MODELS, torchvision:<name>, or hf:<architecture> "
                             "(a transformers causal LM, e.g. hf:LlamaForCausalLM, for data.dataset text)")
    hf: dict[str, Any] = _f(factory=dict, doc="hf: models: fields of the transformers config, e.g. "
                                             "{hidden_size: 64}; vocab_size comes from the data")
    pretrained: str | None = _f(None, "hf: models: a local directory to load weights from (no download)")

    def _check_relations(self) -> None:
        from sparseham.models import MODELS  # imported late: models.py pulls in torchvision

        prefix, _, rest = self.name.partition(":")
        if self.name not in MODELS and not (prefix in ("torchvision", "hf") and rest.strip()):
            reason = _unknown("model", self.name, MODELS, ", torchvision:<name> or hf:<architecture>")
            raise FieldError.bad("name", self.name, reason)
        if prefix != "hf" and (self.hf or self.pretrained):
            key = "hf" if self.hf else "pretrained"
            raise FieldError.bad(key, self.hf or self.pretrained, f"only hf: models use it, not {self.name}")


@dataclass
class ScheduleConfig(Section):
    name: Literal["cosine", "step", "constant"] = _f("cosine", "lr schedule after warmup")
    warmup_epochs: float = _f(0.0, "epochs of linear learning-rate warmup from 0", ge=0)
    milestones: list[float] = _f(
        factory=lambda: [0.5, 0.75],
        doc="step schedule: fractions of training at which lr is multiplied by gamma")
    gamma: float = _f(0.1, "step schedule: factor applied to lr at each milestone", gt=0)

    def _check_relations(self) -> None:
        m = self.milestones
        if not all(0 < x < 1 for x in m) or any(a >= b for a, b in zip(m, m[1:])):
            raise FieldError.bad("milestones", m, "must be increasing fractions in (0, 1)")


@dataclass
class SamConfig(Section):
    rho: float | None = _f(None, "SAM's perturbation radius (Foret et al. 2021: 0.05); null = no SAM", gt=0)
    adaptive: bool = _f(False, "ASAM (Kwon et al. 2021): the perturbation scaled by |w|")


@dataclass
class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = _f("sgd", "base optimizer (HAM, if enabled, wraps it)")
    lr: float = _f(0.05, "peak learning rate", gt=0)
    momentum: float = _f(0.9, "sgd momentum", ge=0, lt=1)
    weight_decay: float = _f(5e-4, "weight decay (decoupled for adamw)", ge=0)
    nesterov: bool = _f(False, "sgd: use Nesterov momentum (needs momentum > 0)")
    betas: tuple[float, float] = _f((0.9, 0.999), "adam/adamw: decay rates of the moment estimates")
    grad_clip: float | None = _f(None, "clip the global gradient norm to this; null = off", gt=0)
    schedule: ScheduleConfig = _f(factory=ScheduleConfig, doc="learning-rate schedule")
    sam: SamConfig = _f(factory=lambda: SamConfig(), doc="sharpness-aware minimization around the base step")

    def _check_relations(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise FieldError.bad("betas", list(self.betas), "each must be in [0, 1)")
        if self.nesterov and self.name != "sgd":
            reason = f"only sgd uses it; set it false for {self.name}"
            raise FieldError.bad("nesterov", True, reason)
        if self.nesterov and self.momentum == 0:
            raise FieldError.bad("nesterov", True, "Nesterov momentum requires optim.momentum > 0")


@dataclass
class HamConfig(Section):
    enabled: bool = _f(False, "wrap the optimizer in HAM: a hyperbolic mirror step after each "
                              "base step")
    alpha: float = _f(200.0, "HAM alpha: strength of the sign-aligned mirror term (may be < 0)")
    beta: float = _f(1e-3, "HAM beta: constant shrinkage toward zero in the exponent")
    sign: Literal["half_step", "pre_step"] = _f(
        "half_step", "weight whose sign is used: after the base step (HYP*) or before it (HYP)")
    clamp: float = _f(0.02, "trust region: bound on |exponent| per step (a weight changes by at most "
                            "e^clamp); 0.02 from the HAM-robustness study, 5 = the authors' code", gt=0)
    max_norm: float | None = _f(
        1000.0, "rescale any parameter whose L2 norm exceeds this (as the official wrapper "
                "does); null = off", gt=0)
    min_ndim: int = _f(2, "only parameters with at least this many dimensions get the mirror "
                          "step", ge=1)
    fused: Literal["auto"] | bool = _f(
        "auto", "auto: base step, mirror step, masks and sign-flip count in one compiled pass per tensor "
                "where it applies (SGD, Adam, AdamW); false: every stage its own pass")
    diagnostics: int = _f(10, "count the entries at the clamp every N steps (at most logging.log_every); "
                              "0 = never", ge=0)
    sam_gradient: Literal["perturbed", "original"] = _f(
        "perturbed", "with optim.sam: the mirror step's gradient, at the perturbed point (what the "
                     "authors' wrapper sees) or at x")


@dataclass
class SparsityConfig(Section):
    method: str = _f(DENSE, "registered sparsification method (methods.available())")
    target: float | None = _f(
        None, "final fraction of zero weights; required unless method is dense", ge=0, lt=1)
    distribution: Literal["uniform", "er", "erk", "global"] | None = _f(
        None, "how the target is split over layers; null = the method's default (global for "
              "scored PaI and AC/DC, uniform for GMP, ERK otherwise)")
    init: Literal["random", "magnitude", "snip", "grasp", "synflow", "existing", "wanda", "sparsegpt"] = _f(
        "random", "how the first mask is scored; existing: the zeros the model already has (static, rigl, "
                  "set, gmp); wanda, sparsegpt: a one-shot prune with calibration data (static)")
    dense_layers: list[str] = _f(factory=list, doc="glob patterns of managed parameters kept dense")
    pattern: str | None = _f(None, "N:M semi-structured sparsity, e.g. '2:4' (target must be 1 - n/m); "
                                   "static, gmp, rigl and set")
    layer_density: dict[str, float] = _f(
        factory=dict, doc="glob -> density for layers with a density of their own, e.g. {'fc3*': 1.0}; "
                          "the rest of the budget is re-solved over the other layers")
    exclude: list[str] = _f(factory=list, doc="glob patterns of parameters the manager skips")
    include: list[str] | None = _f(None, "glob patterns of parameters to manage; null = all")
    options: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "sections": True,
        "help": "the sections sparsity.<name>: an instance of that method's Options"})

    def _check_relations(self) -> None:
        known = _method.available()
        if self.method not in known:
            hint = "" if known else "; import methods to register the built-ins"
            reason = _unknown("method", self.method, known, hint)
            raise FieldError.bad("method", self.method, reason)
        if self.method != DENSE and self.target is None:
            raise FieldError("target", f" is required for method '{self.method}'; "
                                       "set it to the final fraction of zeros in [0, 1)")
        if self.method == DENSE and self.target:
            raise FieldError.bad("target", self.target, "method 'dense' cannot reach a target; "
                                 "set it to 0 or null, or pick a sparse method")
        for pattern, density in self.layer_density.items():
            if not 0.0 <= density <= 1.0:
                raise FieldError.bad("layer_density", {pattern: density},
                                     "a density must be in [0, 1] (the fraction of weights kept)")
        cls = _method.get(self.method)
        for key, supported in (
            ("distribution", getattr(cls, "distributions", _method.DISTRIBUTIONS)),
            ("init", getattr(cls, "inits", _DEFAULT_INITS)),
        ):
            if getattr(self, key) is not None and getattr(self, key) not in supported:
                reason = f"method '{self.method}' supports only {', '.join(supported)}"
                raise FieldError.bad(key, getattr(self, key), reason)
        self._check_options(cls)

    def _check_options(self, cls: type[_method.Method]) -> None:
        self.options, known = dict(self.options), _method.available()
        for name, opts in self.options.items():
            if name not in known or not isinstance(opts, _method.get(name).Options):
                reason = f"expected the Options of a registered method ({', '.join(known)})"
                raise FieldError.bad(name, opts, reason)
        if self.method not in self.options:
            try:
                self.options[self.method] = cls.Options()
            except (TypeError, ValueError) as e:
                raise FieldError(self.method, f": {e}") from None


@dataclass
class TrackingConfig(Section):
    sign_flips: bool = _f(True, "count sign flips of masked and unmasked weights on the device")
    interval: int = _f(1, "steps between sign-flip comparisons", gt=0)
    per_weight: bool = _f(False, "also keep a per-weight flip count (one more byte per weight)")
    fused: bool = _f(False, "compile the tracker update with torch.compile (faster steps, slow first one)")


@dataclass
class TrainConfig(Section):
    epochs: float = _f(1.0, "training length in epochs (fractions allowed)", gt=0)
    max_steps: int | None = _f(None, "stop after this many steps; null = use epochs", gt=0)
    eval_every: int | None = _f(None, "steps between evaluations; null = each epoch end", gt=0)
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    amp: Literal["none", "bf16", "fp16"] = _f("none", "autocast precision of forward and backward")
    compile: bool = _f(False, "torch.compile the model")
    on_nonfinite: Literal["stop", "skip", "ignore"] = _f(
        "stop", "on a non-finite loss or gradient: stop the run, skip the step and count it, or ignore "
                "(no check: saves one device read per step on GPUs)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", gt=0)
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp", "under torchrun: ddp keeps a whole model on every process; fsdp shards every weight "
               "(FSDP2 fully_shard) and runs masks, HAM and the tracker on each shard")

    def _check_relations(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise FieldError.bad("device", self.device, "expected auto, cpu, cuda or cuda:N")


@dataclass
class LoggingConfig(Section):
    tensorboard: bool = _f(True, "write TensorBoard event files into the run directory")
    log_every: int = _f(50, "steps between metric logs (when device counters are read)", gt=0)
    histograms_every: int = _f(0, "steps between weight histograms; 0 = off", ge=0)
    progress: bool = _f(True, "show a progress line on the terminal")


@dataclass
class DistillConfig(Section):
    enabled: bool = _f(False, "knowledge distillation: the loss mixes the task loss with the KL divergence "
                              "to the teacher, the model as loaded from model.pretrained before pruning")
    temperature: float = _f(2.0, "softmax temperature T of teacher and student; the KL term is scaled by T^2 "
                                 "(Hinton et al. 2015)", gt=0)
    weight: float = _f(0.5, "w in (1 - w) * task loss + w * T^2 * KL(teacher || student), in [0, 1]", ge=0)

    def _check_relations(self) -> None:
        if self.weight > 1:
            raise FieldError.bad("weight", self.weight, "a mixing weight is in [0, 1]")
        if not math.isfinite(self.temperature):
            raise FieldError.bad("temperature", self.temperature, "expected a finite temperature > 0")


@dataclass
class CheckpointConfig(Section):
    every: int = _f(500, "steps between checkpoints; 0 = only at the end", ge=0)
    keep: int = _f(2, "number of most recent checkpoints kept", ge=1)
    resume: str = _f("auto", "auto (resume from the run directory if it holds a checkpoint), "
                             "never, or a checkpoint path")

    def _check_relations(self) -> None:
        if not self.resume.strip():
            raise FieldError.bad("resume", self.resume, "expected auto, never or a checkpoint path")


@dataclass
class Config(Section):
    """The whole resolved config; ``config_to_dict`` gives it back in the YAML layout."""

    experiment: ExperimentConfig = _f(factory=ExperimentConfig, doc="run name, seed, output root")
    data: DataConfig = _f(factory=DataConfig, doc="data set and loaders")
    model: ModelConfig = _f(factory=ModelConfig, doc="architecture")
    optim: OptimConfig = _f(factory=OptimConfig, doc="base optimizer and learning-rate schedule")
    ham: HamConfig = _f(factory=HamConfig, doc="Hyperbolic Aware Minimization")
    sparsity: SparsityConfig = _f(factory=SparsityConfig, doc="sparsification method, options")
    tracking: TrackingConfig = _f(factory=TrackingConfig, doc="sign-flip tracking")
    train: TrainConfig = _f(factory=TrainConfig, doc="training loop")
    logging: LoggingConfig = _f(factory=LoggingConfig, doc="metrics, TensorBoard, progress output")
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig, doc="checkpoints and resuming")
    distill: DistillConfig = _f(factory=DistillConfig, doc="knowledge distillation from the dense teacher")

    def _check_relations(self) -> None:
        language_model, text = self.model.name.startswith("hf:"), self.data.dataset == "text"
        if language_model and not text:
            raise FieldError.bad("model.name", self.model.name,
                                 f"a language model needs data.dataset text, not {self.data.dataset!r}")
        if text and not language_model:
            raise FieldError.bad("data.dataset", "text", f"text needs an hf:<architecture> model "
                                 f"(e.g. hf:LlamaForCausalLM), not {self.model.name!r}")
        if self.train.amp == "fp16" and self.optim.sam.rho is not None:
            raise FieldError.bad("train.amp", "fp16", "optim.sam with fp16 is not supported (the GradScaler "
                                 "would have to cover both passes); use bf16 or no AMP")
        if self.distill.enabled and not (language_model and self.model.pretrained):
            raise FieldError.bad("distill.enabled", True, "the teacher is the model as loaded before "
                                 "pruning, so it needs model.pretrained (an hf: model's trained weights)")
        if self.train.distributed == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What sharded training does not run (docs/design/fsdp.md says why)."""
        sp, why = self.sparsity, None
        if sp.method == "static" and sp.init in ("snip", "grasp", "synflow"):
            why = (f"sparsity.init {sp.init} scores a copy of the whole model, which FSDP cannot copy; "
                   "use random or magnitude")
        elif sp.method in ("magnitude", "wanda", "sparsegpt") or sp.init in ("wanda", "sparsegpt"):
            why = "one-shot pruning calibrates whole layers, not shards; prune first (sparseham prune)"
        elif sp.method == "str":
            why = "STR reparameterizes the weights, which fully_shard cannot shard"
        elif sp.pattern and sp.method in ("rigl", "set"):
            why = f"{sp.method} under a pattern swaps weights by indexing across shards; use static or gmp"
        elif self.train.compile:
            why = "train.compile is untested with fully_shard; turn it off"
        elif self.distill.enabled:
            why = "distill.enabled keeps a whole teacher on every process, which fully_shard does not shard"
        if why:
            raise FieldError.bad("train.distributed", "fsdp", f"{why}, or use ddp")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return f"[{', '.join(map(_type_name, args))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _help_lines(cls: type, prefix: str) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints(cls).get(f.name)
        if f.metadata.get("sections") or not f.init:
            continue
        if isinstance(tp, type) and issubclass(tp, Section):
            lines += _help_lines(tp, f"{prefix}{f.name}.")
            continue
        limits = range_text(f.metadata)
        lines.append(f"{prefix}{f.name}: {_type_name(tp) if tp else 'any'} = "
                     f"{_default_text(f).strip()}{f' ({limits})' if limits else ''}")
        lines.append(f"    {f.metadata.get('help', '')}")
    return lines


def help_text() -> str:
    """Every config key with its type, default, range and help, one key per two lines."""
    lines = _help_lines(Config, "")
    for name in _method.available():
        options_cls = _method.get(name).Options
        if dataclasses.fields(options_cls):
            lines.append(f"# sparsity.{name}: options of method '{name}'")
            lines += _help_lines(options_cls, f"sparsity.{name}.")
    return "\n".join(lines)

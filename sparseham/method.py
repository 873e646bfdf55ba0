"""The method plug-in interface and its registry.

A sparsification method fills stages of the fixed per-step pipeline in
:class:`sparseham.MaskManager` through a few small hooks; it never reorders them.
Plug-ins live in ``sparseham.methods`` (``methods/`` in the repository) and register here with
``@methods.register("name")``; the core looks them up by name and never imports them.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from .topk import nm_kept

if TYPE_CHECKING:
    from .masks import MaskManager

__all__ = ["Method", "NoOptions", "register", "get", "available", "suggest"]

_REGISTRY: dict[str, type[Method]] = {}

DISTRIBUTIONS = ("uniform", "er", "erk", "global")


@dataclasses.dataclass
class NoOptions:
    """Options of a method that has none of its own."""


def suggest(name: str, choices: Sequence[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def register(name: str):
    """Class decorator that adds a :class:`Method` subclass to the registry under ``name``."""
    if not name or name != name.lower():
        raise ValueError(f"method names are lowercase and non-empty, got {name!r}")

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) expects a Method subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and _same_definition(known, cls):
            # The same class statement run again (a module imported twice, e.g. under two names,
            # or reloaded): keep one registration.
            cls.name = name
            return known
        if known is not None:
            warnings.warn(f"method {name!r} was registered twice; the later class wins", stacklevel=2)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def parse_pattern(pattern: str | None, target: float, who: str) -> tuple[int, int] | None:
    """``"n:m"`` as ``(n, m)``, checked against ``target``; ``None`` for no pattern."""
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"{who}: pattern {pattern!r} is not 'n:m', e.g. '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"{who}: pattern {pattern!r} needs 0 < n < m")
    if abs(target - (1 - n / m)) > 1e-9:
        raise ValueError(f"{who}: pattern {n}:{m} keeps {n / m:g} of the weights: set the target to "
                         f"{1 - n / m:g}, not {target:g}")
    return n, m


def _same_definition(a: type, b: type) -> bool:
    """Whether ``a`` and ``b`` come from the same ``class`` statement of the same source file."""
    if a is b:
        return True
    try:
        same_file = inspect.getsourcefile(a) == inspect.getsourcefile(b)
    except TypeError:  # a class defined interactively has no file
        same_file = False
    return same_file and a.__qualname__ == b.__qualname__


def get(name: str) -> type[Method]:
    """Return the method class registered under ``name``."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none (import sparseham.methods to register the built-ins)"
        raise KeyError(f"unknown method {name!r}{suggest(name, list(_REGISTRY))}; known: {known}")
    return _REGISTRY[name]


def available() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return tuple(sorted(_REGISTRY))


class Method:
    """Base class of a sparsification method.

    Subclasses set ``Options`` to a dataclass of their own hyperparameters (the YAML section
    ``sparsity.<name>``; every field carries ``metadata["help"]``) and override the hooks they
    need. Hooks run inside :meth:`MaskManager.step`, so they must not synchronise with the
    device on ordinary steps: decide *when* to act from host-side step counters.

    Args:
        target: fraction of the managed weights that is zero at the end of training, in [0, 1).
        distribution: how the target is split over layers: ``uniform``, ``er``, ``erk`` or
            ``global`` (one threshold over all layers, decided at mask time); ``None`` is the
            method's own default (:meth:`distribution_for`).
        dense_layers: glob patterns of managed parameter names kept dense.
        layer_density: glob -> density for managed layers with a density of their own; the rest
            of the budget is re-solved over the other layers (counts stay exact).
        pattern: ``"n:m"`` semi-structured sparsity (e.g. ``"2:4"``): in every group of ``m``
            consecutive inputs of each output, exactly ``n`` weights are kept; ``target`` must be
            ``1 - n/m``. Layers whose fan-in is not a multiple of ``m`` stay dense. Methods that
            support it say so (``supports_pattern``).
        init: how the first mask is scored, for methods that prune at initialization.
        **options: fields of ``Options``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Whether the manager masks grads, weights and optimizer state (stages 2 and 4).
    masking: bool = True
    #: Whether the method honours an N:M ``pattern``.
    supports_pattern: ClassVar[bool] = False
    #: The distribution used when none is given (see :meth:`default_distribution`).
    default_distribution: ClassVar[str] = "erk"

    def __init__(
        self,
        target: float = 0.0,
        *,
        distribution: str | None = None,
        dense_layers: Sequence[str] = (),
        layer_density: Mapping[str, float] | None = None,
        pattern: str | None = None,
        init: str = "random",
        **options: Any,
    ) -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"{self.name or type(self).__name__}: target must be in [0, 1), got {target}")
        if distribution is None:
            distribution = self.distribution_for(init)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {distribution!r}{suggest(distribution, DISTRIBUTIONS)}; "
                f"choose one of {', '.join(DISTRIBUTIONS)}"
            )
        self.target = float(target)
        self.distribution = distribution
        self.dense_layers = tuple(dense_layers)
        if layer_density is not None and not isinstance(layer_density, Mapping):
            raise TypeError(f"layer_density maps glob patterns to densities, like {{'fc3*': 1.0}}; "
                            f"got {type(layer_density).__name__}")
        self.layer_density = dict(layer_density or {})
        self.pattern = parse_pattern(pattern, self.target, self.name or type(self).__name__)
        if self.pattern and not self.supports_pattern:
            raise ValueError(f"{self.name}: no N:M pattern support (static, gmp, rigl and set have it)")
        self.init = init
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(
                f"{self.name or type(self).__name__}: unknown option {unknown[0]!r}"
                f"{suggest(unknown[0], sorted(fields))}; options are: {', '.join(sorted(fields)) or 'none'}"
            )
        self.options = self.Options(**options)

    @classmethod
    def distribution_for(cls, init: str) -> str:
        """The distribution a method uses by default (``distribution=None``) with ``init``."""
        return cls.default_distribution

    # -- hooks, in pipeline order -------------------------------------------------------------
    def setup(self, manager: MaskManager) -> None:
        """Build the first masks (``manager.set_masks``) before the first step."""

    def pre_step(self, manager: MaskManager) -> None:
        """Stage 1: runs before gradients are masked (the dense gradient is still in ``.grad``)."""

    def post_step(self, manager: MaskManager) -> None:
        """Stage 6: topology updates after the weights were stepped, re-masked and tracked."""

    def takes_optimizer_step(self, manager: MaskManager) -> bool:
        """Whether stage 3 runs on this step; ``False`` makes it a topology-only iteration
        (RigL's reference update): the optimizer does not step, and neither ``step_count``, the
        tracker nor :meth:`post_step` moves."""
        return True

    def skip_step(self, manager: MaskManager) -> None:
        """The optimizer skipped this step (a GradScaler found inf or NaN gradients): forget what
        :meth:`pre_step` prepared; :meth:`post_step` does not run and ``step_count`` stays."""

    def tracking_masks(self, manager: MaskManager) -> list[Tensor] | None:
        """The masks the sign-flip tracker splits by; ``None`` means the manager's masks."""
        return manager.masks

    def tracking_masks_fixed(self, manager: MaskManager) -> bool:
        """Whether :meth:`tracking_masks` is known before the optimizer step (it does not depend on
        the weights the step produces), so the tracker can run inside a one-pass step."""
        return True

    def effective_weights(self, manager: MaskManager) -> list[Tensor]:
        """The weights the forward pass uses; their zeros define the achieved sparsity."""
        return manager.params

    def promised_sparsity(self, manager: MaskManager) -> float:
        """The sparsity training ends at: the target; under an N:M pattern, what the pattern keeps,
        which is below the target when some layers have no groups and stay dense."""
        if not self.pattern:
            return self.target
        total = sum(p.numel() for p in manager.params)
        return 1.0 - sum(nm_kept(p.shape, *self.pattern) for p in manager.params) / total

    def summary(self) -> dict[str, Any]:
        """What the method reports in ``final.json`` (``method_summary``), e.g. STR's projection."""
        return {}

    def finalize(self, manager: MaskManager) -> None:
        """Called once at the end of training, e.g. to bake in an implicit mask."""

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Host-side state needed to resume exactly (masks are saved by the manager)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(target={self.target}, distribution={self.distribution!r}, "
            f"options={self.options})"
        )

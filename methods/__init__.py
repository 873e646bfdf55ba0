"""Sparsification methods as plug-ins: one file each, registered by name.

>>> from sparseham import methods
>>> methods.get("rigl")(target=0.9, distribution="erk")

This folder installs as ``sparseham.methods``. Add a method by subclassing
:class:`sparseham.Method` in a new file here, decorating it with ``@methods.register("name")``,
and importing the file at the bottom of this module.
"""

from sparseham.method import Method, available, get, register

__all__ = ["Method", "available", "get", "register"]

# Importing the plug-ins registers them.
from . import acdc, dense, gmp, magnitude, rigl, sparsegpt, static, str, wanda  # noqa: E402,F401

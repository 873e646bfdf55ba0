"""Sparsification methods as plug-ins: one file each, registered by name.

>>> import methods
>>> methods.get("rigl")(target=0.9, distribution="erk")

Add a method by subclassing :class:`sparseham.Method` in a new file here and decorating it with
``@methods.register("name")``; then import the file below.
"""

from sparseham.method import Method, available, get, register

__all__ = ["Method", "available", "get", "register"]

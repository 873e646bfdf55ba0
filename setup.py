"""The package list, read from the tree (the metadata is in setup.cfg).

``sparseham/`` and every subpackage under it, and ``methods/``, ``analysis/`` and ``configs/`` with
theirs, installed as ``sparseham.methods``, ``sparseham.analysis`` and ``sparseham.configs``
(setup.cfg's ``package_dir``). ``find:`` in setup.cfg cannot list the mapped folders under their
installed names, so a new subpackage anywhere would otherwise need a line by hand.
"""

from setuptools import find_packages, setup

MAPPED = {"sparseham.methods": "methods", "sparseham.analysis": "analysis", "sparseham.configs": "configs"}

packages = find_packages(include=["sparseham", "sparseham.*"])
for name, folder in MAPPED.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages)

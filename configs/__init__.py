"""The shipped YAML configs, installed as package data (``sparseham.configs``).

``sparseham train --config NAME`` finds ``NAME.yaml`` here; ``sparseham configs`` lists them.
"""

"""Integrations with training frameworks that own the loop (optional extras):

- :mod:`sparseham.integrations.hf`: a Hugging Face ``transformers`` Trainer (``pip install .[hf]``);
- :mod:`sparseham.integrations.lightning`: a Lightning ``Callback`` (``pip install .[lightning]``).

Both build a :class:`sparseham.MaskManager` around the framework's optimizer and hand the framework
the manager's pipeline as its optimizer (:meth:`sparseham.MaskManager.as_optimizer`), so every
``optimizer.step()`` it makes runs the whole sparse pipeline; the manager's state travels in the
framework's own checkpoints.
"""

"""The README's Python snippets run as written."""

import re
from pathlib import Path

import torch

from sparseham import method as registry

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_short_use_snippet_trains():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    scope = {"loader": [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)] * 3}
    exec(SNIPPETS[0], scope)
    mm = scope["mm"]
    assert mm.step_count == 11  # the first iteration is RigL's topology-only update (its reference)
    assert abs(mm.sparsity() - 0.9) < 1e-3
    assert set(mm.tracker.read()) == {"1.weight", "3.weight"}  # the tracker follows both Linear weights


def test_adding_a_method_snippet_registers_a_working_method():
    saved = dict(registry._REGISTRY)
    try:
        scope = {}
        (snippet,) = [s for s in SNIPPETS if "@register(" in s]
        exec(snippet, scope)
        from sparseham import MaskManager

        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mm = MaskManager(model, opt, registry.get("gmp_fixed")(target=0.75, every=2))
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            mm.step()
            opt.zero_grad()
        mm.verify()
        assert abs(mm.sparsity() - 0.75) < 0.01
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)

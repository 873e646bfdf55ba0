"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_short_use_snippet_learns_fashion_mnist_in_one_epoch():
    """Issue 11: the snippet as written (alpha 200, the default trust region) on the real data."""
    from sparseham.data import build_data

    data = build_data("fashion_mnist", root=str(Path(__file__).resolve().parents[1] / "data"), batch_size=128,
                      seed=0)
    torch.manual_seed(0)
    scope = {"loader": data.train.epoch(0)}
    exec(SNIPPETS[0], scope)
    model, mm = scope["model"], scope["mm"]
    correct = seen = 0
    with torch.no_grad():
        for x, y in data.test.epoch(0):
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    assert seen == 10_000 and correct / seen >= 0.80
    assert abs(mm.sparsity() - 0.9) < 1e-3

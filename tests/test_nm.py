"""N:M (2:4) semi-structured masks: exact groups after static, GMP and RigL training, with and without
HAM, through the app; errors in one line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparseham import MaskManager, methods
from sparseham.config import load_config
from sparseham.topk import nm_mask
from sparseham.train import run
from sparseham.train.checkpoint import load_checkpoint

SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=64", "train.max_steps=40",
        "logging.log_every=10", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0",
        "sparsity.target=0.5", "sparsity.pattern=2:4", "sparsity.rigl.update_every=8", "sparsity.gmp.every=4"]


def _groups_of_four(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1, 4).sum(-1)


def test_nm_mask_keeps_exactly_n_of_every_m():
    scores = torch.randn(6, 3, 2, 2)  # fan-in 12: three groups of 4 per output
    mask = nm_mask(scores, 2, 4)
    assert torch.equal(_groups_of_four(mask), torch.full((6, 3), 2))
    kept = scores.reshape(6, -1, 4)
    inside = mask.reshape(6, -1, 4)
    assert torch.all(kept.masked_fill(~inside, torch.inf).min(-1).values >=
                     kept.masked_fill(inside, -torch.inf).max(-1).values)  # the 2 highest of each group
    assert nm_mask(torch.randn(4, 5), 2, 4).all()  # fan-in 5: no groups, the layer stays dense
    assert torch.equal(_groups_of_four(nm_mask(torch.zeros(2, 8), 2, 4)), torch.full((2, 2), 2))  # ties


@pytest.mark.parametrize("ham", [False, True], ids=["plain", "ham"])
@pytest.mark.parametrize("config", ["random_pai", "snip", "gmp", "rigl"])
def test_every_group_of_four_after_training(tmp_path, config, ham):
    sets = [*SETS, f"ham.enabled={str(ham).lower()}"]
    assert run(load_config(f"configs/{config}.yaml", sets), tmp_path) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    names, masks = state["manager"]["names"], state["manager"]["masks"]
    assert names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name, mask in zip(names, masks):
        assert torch.equal(_groups_of_four(mask), torch.full_like(_groups_of_four(mask), 2)), name
        assert torch.all(state["model"][name][~mask] == 0), name
    if config == "rigl":  # the pattern held through real topology updates
        events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        churn = [e["churn"] for e in events if e["event"] == "mask" and e["churn"]]
        assert churn and sum(sum(c.values()) for c in churn) > 0


def test_a_pattern_is_a_string_not_a_base_60_number(tmp_path):
    # YAML 1.1 reads an unquoted 2:4 as the integer 124; configs read it as YAML 1.2 does.
    path = tmp_path / "nm.yaml"
    path.write_text("sparsity: {method: rigl, target: 0.5, pattern: 2:4}\noptim: {lr: 0x1}\n")
    cfg = load_config(path)
    assert cfg.sparsity.pattern == "2:4" and cfg.optim.lr == 1
    cfg = load_config("configs/rigl.yaml", ["sparsity.pattern=1:4", "sparsity.target=0.75"])
    assert cfg.sparsity.pattern == "1:4"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": 0.9, "pattern": "2:4"}, r"rigl: pattern 2:4 keeps 0.5 of the weights: set the target to 0.5, "
                                        r"not 0.9"),
    ({"target": 0.5, "pattern": "two:four"}, r"rigl: pattern 'two:four' is not 'n:m', e.g. '2:4'"),
    ({"target": 0.0, "pattern": "4:4"}, r"rigl: pattern '4:4' needs 0 < n < m"),
])
def test_pattern_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.get("rigl")(**kwargs)


def test_methods_without_pattern_support_say_so():
    message = r"acdc: no N:M pattern support \(static, gmp, rigl and set have it\)"
    with pytest.raises(ValueError, match=message):
        methods.get("acdc")(0.5, pattern="2:4")


def test_a_layer_without_groups_stays_dense():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))  # fan-ins 6 (no groups) and 8
    with pytest.warns(UserWarning, match=r"pattern 2:4 leaves 0.weight dense \(fan-in not a multiple of 4\); "
                                         r"the model ends at sparsity 0.1250, not 0.5"):
        mm = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         methods.get("static")(0.5, pattern="2:4", init="magnitude"))
    assert mm.masks[0].all() and mm.kept().tolist() == [48, 8]
    assert mm.method.promised_sparsity(mm) == pytest.approx(1 - 56 / 64) == pytest.approx(mm.sparsity())
    mm.verify()


def test_a_conv_model_ends_at_what_the_pattern_promises(tmp_path):
    # LeNet-5's conv1 (fan-in 25) and, on the small synthetic images, fc1 (fan-in 50) have no groups
    # of 4: they stay dense, and the run ends cleanly at what the pattern can keep.
    sets = [s for s in SETS if not s.startswith("model.")] + ["model.name=lenet5"]
    with pytest.warns(UserWarning, match=r"leaves conv1.weight, fc1.weight dense .* ends at sparsity 0.2703"):
        assert run(load_config("configs/rigl.yaml", sets), tmp_path) == 0
    assert json.loads((tmp_path / "final.json").read_text())["sparsity"] == pytest.approx(0.2703, abs=1e-4)

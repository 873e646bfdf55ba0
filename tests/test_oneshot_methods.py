"""Tests for the one-shot plug-ins (methods/magnitude.py, wanda.py, sparsegpt.py, _oneshot.py) and
``init: existing`` (static, rigl, set, gmp): prune a tiny LLaMA, reload it with plain transformers,
fine-tune it with HAM while the mask holds."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparseham import HAM, MaskManager, methods
from sparseham.config import load_config
from sparseham.train.build import build_method

transformers = pytest.importorskip("transformers")
CASES = list(itertools.product(("magnitude", "wanda", "sparsegpt"), ({"target": 0.5}, {"target": 0.5,
                                                                                        "pattern": "2:4"})))


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(n)]


def _fine_tune(model, mm, opt, batches, steps: int = 3):
    model.train()
    for x in itertools.islice(itertools.cycle(batches), steps):
        model(x, labels=x).loss.backward()
        mm.step()
        opt.zero_grad()


def _check_pattern(mm, pattern):
    for name, mask in zip(mm.names, mm.masks):
        if pattern:
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert int(mask.sum()) * 2 == mask.numel(), name  # uniform: every layer exactly at 50%


@pytest.mark.parametrize(("method", "how"), CASES)
def test_prune_reload_with_plain_transformers_and_fine_tune_with_ham(tmp_path, method, how):
    model, batches = _llama(), _batches()
    opt = HAM(torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=20.0, fused=False)
    mm = MaskManager(model, opt, methods.get(method)(how["target"], pattern=how.get("pattern")), data=batches)
    assert "lm_head.weight" not in mm.names and len(mm.names) == 14
    _check_pattern(mm, how.get("pattern"))
    assert mm.method.summary()["calibration_batches"] == (0 if method == "magnitude" else 4)
    for name, mask in zip(mm.names, mm.masks):
        assert torch.equal(model.get_parameter(name) != 0, mask), name  # pruned: exactly 0, kept: not
    model.save_pretrained(tmp_path / "pruned")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, mask in zip(mm.names, mm.masks):
        assert torch.equal(reloaded.get_parameter(name) != 0, mask), name
    opt = HAM(torch.optim.AdamW(reloaded.parameters(), lr=1e-3), alpha=20.0, fused=False)
    existing = methods.get("static")(0.5, init="existing", pattern=how.get("pattern"))
    again = MaskManager(reloaded, opt, existing)
    assert all(torch.equal(a, b) for a, b in zip(again.masks, mm.masks)) and again.method.summary() == {}
    before = [p.detach().clone() for p in again.params]
    _fine_tune(reloaded, again, opt, batches)
    again.verify()
    for p, b, mask in zip(again.params, before, again.masks):
        assert bool((p[~mask] == 0).all()) and not torch.equal(p, b)  # trained, zeros held


def test_the_plug_in_fine_tunes_in_place_and_sparsegpt_changes_kept_weights():
    model, batches = _llama(), _batches()
    dense = [p.detach().clone() for p in model.parameters()]
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.01), alpha=20.0, fused=False)
    mm = MaskManager(model, opt, methods.get("sparsegpt")(0.5), data=batches)
    before = {id(p): d for p, d in zip(model.parameters(), dense)}
    moved = [not torch.equal(p[m], before[id(p)][m]) for p, m in zip(mm.params, mm.masks)]
    assert all(moved)  # reconstruction, not only a mask
    _fine_tune(model, mm, opt, batches)
    mm.verify()
    assert mm.sparsity() == 0.5 and all(v > 0 for v in mm.method.summary()["obs_error"].values())


@pytest.mark.parametrize("name", ["rigl", "set", "gmp", "static"])
def test_dynamic_methods_continue_from_the_zeros_a_one_shot_prune_left(name):
    model = _llama()
    pruned = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.01),
                         methods.get("wanda")(0.5, owl=True), data=_batches())
    target = 0.7 if name == "gmp" else 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="no topology update") if name in ("rigl", "set") else _nothing():
        mm = MaskManager(model, opt, methods.get(name)(target, init="existing"), total_steps=10)
    assert all(torch.equal(a, b) for a, b in zip(mm.masks, pruned.masks))  # not a random mask
    assert mm.expected == [int(m.sum()) for m in pruned.masks]  # the prune's own per-layer counts
    if name == "gmp":
        assert mm.method.sparsity_at(0) == pytest.approx(0.5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_init_existing_refuses_a_model_whose_zeros_miss_the_target():
    model = _llama()
    rigl = methods.get("rigl")(0.5, init="existing", update_every=2)
    with pytest.raises(ValueError, match=r"rigl: init 'existing': the managed weights are 0.00% zeros, but "
                                         r"the target is 50.00%; prune the model first"):
        MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), rigl, total_steps=10)
    with pytest.raises(ValueError, match=r"gmp: unknown init 'wanda'; choose one of random, existing"):
        methods.get("gmp")(0.5, init="wanda")


def test_static_init_wanda_is_the_wanda_method():
    a, b = _llama(), _llama()
    batches = _batches(2)
    one = MaskManager(a, torch.optim.SGD(a.parameters(), lr=0.1), methods.get("wanda")(0.5), data=batches)
    two = MaskManager(b, torch.optim.SGD(b.parameters(), lr=0.1),
                      methods.get("static")(0.5, init="wanda", batches=2), data=iter(batches))
    assert two.method.distribution == "uniform"
    assert all(torch.equal(x, y) for x, y in zip(one.masks, two.masks))
    assert two.method.summary()["calibration_batches"] == 2


def test_every_given_batch_calibrates_and_an_iterator_gives_sixteen():
    from sparseham.methods._oneshot import calibration_batches

    assert len(calibration_batches(list(range(40)), None)) == 40
    assert len(calibration_batches(iter(range(40)), None)) == 16
    assert len(calibration_batches(range(40), 3)) == 3
    assert calibration_batches(None, None) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"owl": True, "pattern": "2:4"}, "wanda: owl allocates unstructured sparsity"),
    ({"batches": 0}, r"batches must be an integer >= 1 or null, got 0"),
    ({"owl": True, "owl_m": -1.0}, r"OWL m must be a finite number > 0.0, got -1.0"),
    ({"sequential": "yes"}, "sequential must be true or false or null, got 'yes'"),
])
def test_plug_in_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        methods.get("wanda")(0.5, **kwargs)


def test_a_calibrated_method_without_data_says_how_to_give_it():
    model = _llama()
    with pytest.raises(ValueError, match=r"wanda: method 'wanda' needs calibration batches; none were given; "
                                         r"pass MaskManager\(\.\.\., data=batches\)"):
        MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1), methods.get("wanda")(0.5))


def test_yaml_selects_the_one_shot_methods_and_init_existing():
    cfg = load_config("lm_rigl_ham", ["sparsity.method=wanda", "sparsity.target=0.5",
                                      "sparsity.wanda.batches=4", "sparsity.wanda.owl=true"])
    method = build_method(cfg)
    assert method.name == "wanda" and method.options.batches == 4 and method.options.owl
    assert build_method(load_config("lm_rigl_ham", ["sparsity.init=existing"])).init == "existing"
    assert build_method(load_config("lm_rigl_ham", ["sparsity.method=static", "sparsity.init=sparsegpt",
                                                    "sparsity.target=0.5"])).init == "sparsegpt"


@pytest.mark.slow
def test_sparseham_train_prunes_then_fine_tunes_or_continues_from_sparseham_prune(tmp_path):
    import json

    from sparseham.train import prune as prune_cli
    from sparseham.train import run
    from sparseham.train.checkpoint import load_checkpoint

    _llama().save_pretrained(tmp_path / "dense")
    sets = ["train.max_steps=4", "train.eval_every=null", "logging.log_every=2", "logging.progress=false",
            "checkpoint.every=0", "data.text.max_bytes=40000", "data.text.seq_len=32", "data.batch_size=4",
            "sparsity.target=0.5"]
    one = sets + [f"model.pretrained={tmp_path / 'dense'}", "sparsity.method=wanda", "sparsity.pattern=2:4",
                  "sparsity.wanda.batches=3"]
    assert run(load_config("lm_rigl_ham", one), tmp_path / "run") == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["sparsity"] == 0.5 and final["method_summary"]["calibration_batches"] == 3
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    for name, mask in zip(state["manager"]["names"], state["manager"]["masks"]):
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
        assert bool((state["model"][name][~mask] == 0).all())

    argv = [tmp_path / "dense", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "2",
            "--seqlen", "32", "--eval-windows", "1", "--out", tmp_path / "pruned"]
    assert prune_cli.main([str(a) for a in argv]) == 0
    two = sets + [f"model.pretrained={tmp_path / 'pruned'}", "sparsity.method=rigl", "sparsity.init=existing",
                  "sparsity.rigl.update_every=2"]
    assert run(load_config("lm_rigl_ham", two), tmp_path / "run2") == 0
    from safetensors.torch import load_file

    pruned = load_file(tmp_path / "pruned" / "masks.safetensors")
    state = load_checkpoint(tmp_path / "run2" / "checkpoint.pt")
    masks = dict(zip(state["manager"]["names"], state["manager"]["masks"]))
    assert [int(m.sum()) for m in masks.values()] == [int(pruned[n[3:]].sum()) for n in masks]  # lm. prefix

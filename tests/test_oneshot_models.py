"""Tests for sparseham/oneshot on whole models: a LLaMA against the authors' code (see
tests/test_oneshot.py for where ``tests/data/llama_reference.pt`` comes from), GPT-2's Conv1D,
convolutions, the calibration engine, and the allocations (global, OWL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparseham import layer_counts
from sparseham.oneshot import OWL, LayerView, allocate, find_blocks, prune

transformers = pytest.importorskip("transformers")
DATA = Path(__file__).parent / "data"


def _llama(**overrides) -> nn.Module:
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="eager")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()


def _llama_weights(model: nn.Module) -> nn.Module:
    """The reference model's weights: seeded, in sorted-name order, independent of transformers."""
    g = torch.Generator().manual_seed(3131)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.08 * noise)
    return model


def _gpt2(layers: int = 2) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def _loss(model, held) -> float:
    with torch.no_grad():
        return float(model(held, labels=held).loss)


@pytest.fixture(scope="module")
def llama_ref():
    return torch.load(DATA / "llama_reference.pt")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("key", ["unstructured", "2:4"])
def test_a_whole_llama_prunes_as_the_reference_does(llama_ref, method, key):
    r = llama_ref
    model = _llama_weights(_llama())
    calib = [r["calib"][j:j + 1] for j in range(len(r["calib"]))]
    how = {"pattern": (2, 4)} if key == "2:4" else {"sparsity": 0.5}
    result = prune(model, calib, method=method, **how)
    assert len(result.names) == 14 and "lm_head.weight" not in result.names
    for name, mask in zip(result.names, result.masks):
        bits = np.unpackbits(r[f"{method}/{key}/{name}"].numpy())[: mask.numel()]
        assert torch.equal(mask.reshape(-1), torch.from_numpy(bits.astype(bool))), name
    assert _loss(model, r["held"]) == pytest.approx(r[f"{method}/{key}/loss"], abs=2e-6)


def test_the_sequential_path_calibrates_each_block_on_the_pruned_blocks_before_it(llama_ref):
    """Block by block differs from one pass over the unpruned model, and the reference (above)
    agrees with block by block."""
    calib = [llama_ref["calib"]]
    a, b = _llama_weights(_llama()), _llama_weights(_llama())
    first = prune(a, calib, method="wanda", sparsity=0.5)
    simple = prune(b, calib, method="wanda", sparsity=0.5, sequential=False)
    same = [torch.equal(x, y) for x, y in zip(first.masks, simple.masks)]
    assert all(same[:7]) and not all(same[7:])  # block 0 sees the same inputs, block 1 does not


def test_gpt2_conv1d_projections_are_pruned_along_their_inputs():
    model = _gpt2()
    calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))]
    result = prune(model, calib, method="sparsegpt", pattern=(2, 4))
    assert [n.split(".", 3)[-1] for n in result.names[:4]] == [
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    for name, mask in zip(result.names, result.masks):
        weight = model.get_parameter(name)
        assert mask.shape == weight.shape and torch.equal(weight == 0, ~mask)
        groups = mask.t().reshape(mask.shape[1], -1, 4).sum(-1)  # stored (in, out): inputs are dim 0
        assert bool((groups == 2).all()), name
    assert model.lm_head.weight is model.transformer.wte.weight and bool((model.lm_head.weight != 0).all())


def test_a_vision_model_is_calibrated_in_one_pass_with_unfolded_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding="valid"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 7 * 7, 10))
    batches = [(torch.randn(4, 3, 16, 16), torch.zeros(4)) for _ in range(3)]
    assert find_blocks(model, []) is None
    for method in ("wanda", "sparsegpt"):
        result = prune(model, batches, method=method, sparsity=0.6)
        shapes = {n: tuple(model.get_parameter(n).shape) for n in result.names}
        assert result.kept == list(layer_counts(shapes, 0.6, "uniform").values())
        assert all(m.sum() == k and torch.equal(model.get_parameter(n) != 0, m)
                   for n, m, k in zip(result.names, result.masks, result.kept))
    x = torch.randn(2, 8, 9, 9)
    conv = model[2]
    view = LayerView("2.weight", conv)
    rows = view.rows(x)  # im2col: one row per output position
    expected = conv(x) - conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(rows @ view.matrix().t(), expected.permute(0, 2, 3, 1).reshape(-1, 8))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, padding="same", dilation=2),
                                  nn.Conv2d(4, 6, (3, 2), padding="same")])
def test_unfolded_rows_reproduce_the_convolution(conv):
    x = torch.randn(2, 4, *([11] if isinstance(conv, nn.Conv1d) else [7, 6]))
    view = LayerView("w", conv)
    out = conv(x) - conv.bias.view(1, -1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(view.rows(x) @ view.matrix().t(), out.movedim(1, -1).reshape(-1, 6))


def test_calibration_leaves_no_trace_and_uses_every_batch():
    model = _gpt2(1).train()
    model.config.use_cache = True
    batches = [torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    whole = _gpt2(1)
    whole.load_state_dict(model.state_dict())
    prune(model, batches, method="wanda", sparsity=0.5)
    assert model.training and all(m.training for m in model.modules()) and model.config.use_cache
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    prune(whole, [torch.cat(batches)], method="wanda", sparsity=0.5)  # the same rows in one batch
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole.parameters()))


def test_global_and_owl_allocations_meet_the_target_exactly():
    calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for how in ({"distribution": "global"}, {"owl": OWL()}):
            model = _llama_weights(_llama())
            result = prune(model, calib, method=method, sparsity=0.6, **how)
            assert sum(result.kept) == round(0.4 * sum(m.numel() for m in result.masks))
            zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in result.names)
            assert zeros == sum(m.numel() for m in result.masks) - sum(result.kept)
            if "owl" in how:  # densities within the target +- lambda, one per block
                density = [k / m.numel() for k, m in zip(result.kept, result.masks)]
                assert all(0.4 - 0.08 - 1e-3 <= d <= 0.4 + 0.08 + 1e-3 for d in density)
                assert len({round(d, 3) for d in density[:7]}) == 1


def test_a_global_threshold_that_empties_a_layer_says_so():
    model = _llama_weights(_llama())
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(1e-6)
    with pytest.warns(UserWarning, match=r"distribution 'global' prunes model.layers.0.self_attn.o_proj."
                                         r"weight entirely \(layer collapse\)"):
        result = prune(model, [], method="magnitude", sparsity=0.5, distribution="global")
    assert result.kept[3] == 0


def test_owl_counts_follow_the_reference_formula():
    """luuyin/OWL prune_wanda_outlier: D = (r - min) / (max - min) * 2 lambda; D - mean(D) + 1 - s."""
    ratios = {0: 0.02, 1: 0.05, 2: 0.03}
    shapes = {f"l{g}": (100, 100) for g in ratios}
    counts = allocate.owl_counts(shapes, {f"l{g}": g for g in ratios}, ratios, 0.5, 0.08)
    r = np.array(list(ratios.values()))
    d = (r - r.min()) / (r.max() - r.min()) * 0.08 * 2
    d = d - d.mean() + 0.5
    assert [counts[f"l{g}"] for g in ratios] == [round(v * 10_000) for v in d]
    assert allocate.outlier_ratio([torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 1, 100])], 5.0) == 0.1


def test_global_counts_rank_all_layers_together():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0, 6.0]])}
    assert allocate.global_counts(scores, 0.5) == {"a": 1, "b": 2}
    assert allocate.global_counts(scores, 0.5, dense=["b"]) == {"a": 1, "b": 2}
    assert allocate.global_counts(scores, 0.5, fixed={"b": 0.0}) == {"a": 3, "b": 0}


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    (nn.Linear(6, 4), {"method": "wanda", "pattern": (2, 4)},
     r"needs an input size that is a multiple of 4: weight \(6 inputs\)"),
    (nn.Linear(8, 4), {"method": "wanda", "sparsity": 1.0}, r"must be a number in \[0, 1\), got 1.0"),
    (nn.Linear(8, 4), {"method": "wanda", "sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
    (nn.Linear(8, 4), {"method": "obs"}, "unknown one-shot method 'obs'"),
    (nn.Linear(8, 4), {"method": "sparsegpt"}, "'sparsegpt' needs calibration batches; none were given"),
    (nn.Linear(8, 4), {"method": "wanda", "pattern": (2, 4), "owl": OWL()}, "OWL allocates unstructured"),
    (nn.Conv2d(4, 4, 3, groups=2), {"method": "wanda"}, "supports Conv1d and Conv2d with groups=1"),
    (nn.Embedding(10, 4), {"method": "wanda"}, "needs the weight of a Linear"),
    (nn.Linear(8, 4), {"method": "wanda", "include": ["nothing"]}, "nothing to prune"),
    (nn.Linear(8, 4), {"method": "wanda", "sequential": True}, "sequential calibration needs"),
])
def test_prune_refuses_bad_requests_before_changing_anything(model, kwargs, message):
    kwargs.setdefault("params", None if "include" in kwargs else list(model.named_parameters())[:1])
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        prune(model, [torch.randn(2, 8)] if kwargs["method"] != "sparsegpt" else [], **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_layer_the_forward_pass_never_uses_is_named():
    model = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    model.forward = lambda x: model["used"](x)
    with pytest.raises(ValueError, match="unused.weight saw no calibration input"):
        prune(model, [torch.randn(4, 8)], method="wanda", sparsity=0.5)

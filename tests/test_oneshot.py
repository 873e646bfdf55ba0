"""Tests for sparseham/oneshot: magnitude, Wanda and SparseGPT against the authors' code, a
plain-Python transcription, and invariants; the calibration engine; the allocations.

Reference numbers (the repository holds no copy of the authors' code):

- ``tests/data/oneshot_reference.pt`` comes from ``/tmp/ref/make_reference.py`` (described here, kept
  outside the project): a 16x160 float32 weight and 4x48 calibration inputs of 160 features (float16,
  scaled per feature by ``exp(N(0, 1))`` so that Wanda and magnitude disagree), seeded
  ``torch.Generator().manual_seed(31)``. It ran locuslab/wanda ``lib/prune.py`` (commit 8e8fc87)
  ``prune_wanda`` and ``prune_magnitude`` on a stand-in model whose only decoder layer holds the
  ``nn.Linear``, and IST-DASLab/sparsegpt ``sparsegpt.py`` (commit 147d215) ``SparseGPT.add_batch``
  per sequence and ``fasterprune(percdamp=0.01, blocksize=128)`` on the ``nn.Linear`` and on a
  transformers ``Conv1D`` holding the transposed weight; it saved their masks, reconstructed weights
  and errors ``||X W^T - X W'^T||^2``. Unstructured sparsity ran at 0.4999 for their SparseGPT and
  magnitude: their ``<=`` on the sorted scores prunes ``int(n * s) + 1``, which is then exactly half
  of each block (and of the layer), the count sparseham prunes at 0.5.
- ``tests/data/llama_reference.pt`` comes from ``/tmp/ref/make_llama_reference.py``: under
  transformers 4.40.2 (the API their ``prepare_calibration_input`` expects) it built the LLaMA of
  :func:`_llama` with the weights of :func:`_llama_weights`, ran locuslab/wanda's ``prune_wanda``,
  ``prune_sparsegpt`` and ``prune_magnitude`` (4 calibration sequences of 32 random tokens,
  sparsity 0.5, or 0.4999 as above; and 2:4), and saved every projection's mask (``np.packbits``)
  and the next-token loss of the pruned model on two held-out sequences.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from sparseham.oneshot import Stats, magnitude_keep, prune, sparsegpt, wanda_keep
from sparseham.oneshot.solvers import block_counts, row_keep

DATA = Path(__file__).parent / "data"
PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


@pytest.fixture(scope="module")
def ref():
    r = torch.load(DATA / "oneshot_reference.pt")
    weight, x = r["weight"].float(), r["x"].float()
    stats = Stats(weight.shape[1], weight.device, hessian=True)
    for seq in x:
        stats.add(seq)
    return r, weight, x.reshape(-1, weight.shape[1]), stats


def _how(weight, key):
    return {"pattern": PATTERNS[key]} if PATTERNS[key] else {"prune": weight.numel() // 2}


def _error(weight, new, rows):
    return float(((rows @ weight.t() - rows @ new.t()) ** 2).sum())


@pytest.mark.parametrize("key", PATTERNS)
def test_wanda_and_magnitude_masks_equal_the_references(ref, key):
    r, weight, _, stats = ref
    assert torch.equal(wanda_keep(weight, stats.norms(), **_how(weight, key)), r[f"wanda_keep/{key}"])
    assert torch.equal(magnitude_keep(weight, **_how(weight, key)), r[f"magnitude_keep/{key}"])
    assert not torch.equal(r[f"wanda_keep/{key}"], r[f"magnitude_keep/{key}"])  # the data tell them apart


@pytest.mark.parametrize("key", PATTERNS)
def test_sparsegpt_reconstruction_equals_the_reference(ref, key):
    r, weight, rows, stats = ref
    theirs = r[f"sparsegpt_weight/{key}"]
    mine = sparsegpt(weight, stats.hessian(), **_how(weight, key))
    assert torch.equal(mine.keep, theirs != 0)
    assert torch.equal(mine.weight == 0, theirs == 0)
    # float32 rounding of two orders of the same sums: 2e-6 observed on weights up to 3.8.
    torch.testing.assert_close(mine.weight, theirs, rtol=0, atol=1e-5)
    assert _error(weight, mine.weight, rows) == pytest.approx(r[f"sparsegpt_error/{key}"], rel=1e-5)


def test_sparsegpt_on_a_transformers_conv1d_equals_the_reference(ref):
    from transformers.pytorch_utils import Conv1D

    r, weight, rows, _ = ref
    layer = Conv1D(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(weight.t())
    result = prune(nn.Sequential(layer), [rows], method="sparsegpt", pattern=(2, 4))
    torch.testing.assert_close(layer.weight.t(), r["sparsegpt_weight/conv1d_2:4"], rtol=0, atol=1e-5)
    assert torch.equal(result.masks[0], layer.weight != 0) and result.masks[0].shape == (160, 16)


@pytest.mark.parametrize("key", PATTERNS)
def test_errors_order_sparsegpt_below_wanda_below_magnitude(ref, key):
    r, weight, rows, stats = ref
    errors = {m: r[f"{m}_error/{key}"] for m in ("sparsegpt", "wanda", "magnitude")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]  # the reference's own numbers
    for seed in range(3):  # and sparseham's on other layers of the same kind
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(24, 64, generator=g)
        x = torch.randn(256, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
        s = Stats(64, w.device, hessian=True)
        s.add(x)
        how = _how(w, key)
        mine = {"sparsegpt": sparsegpt(w, s.hessian(), **how).weight,
                "wanda": w * wanda_keep(w, s.norms(), **how), "magnitude": w * magnitude_keep(w, **how)}
        err = {m: _error(w, v, x) for m, v in mine.items()}
        assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], (seed, err)


def _wanda_by_hand(weight: list[list[float]], rows: list[list[float]], prune: int) -> list[list[bool]]:
    """Wanda in plain Python (Sun et al. 2023, Eq. 1 and Sec. 3 'comparison group: per output'):
    S_ij = |W_ij| * sqrt(sum_n x_nj^2); each row drops its lowest scores, prune // rows of them,
    one more in the first prune % rows rows."""
    norms = [math.sqrt(sum(r[j] ** 2 for r in rows)) for j in range(len(weight[0]))]
    each, extra = divmod(prune, len(weight))
    keep = []
    for i, w in enumerate(weight):
        scores = [abs(v) * n for v, n in zip(w, norms)]
        drop = set(sorted(range(len(w)), key=lambda j: scores[j])[: each + (i < extra)])
        keep.append([j not in drop for j in range(len(w))])
    return keep


def test_wanda_equals_a_plain_python_transcription_over_random_inputs():
    rng = random.Random(5)
    for _ in range(12):
        out, cols, n = rng.randint(1, 9), rng.randint(2, 17), rng.randint(1, 30)
        weight = [[rng.gauss(0, 1) for _ in range(cols)] for _ in range(out)]
        rows = [[rng.gauss(0, 1) * (j + 1) for j in range(cols)] for _ in range(n)]
        prune = rng.randint(0, out * cols)
        stats = Stats(cols, torch.device("cpu"), hessian=rng.random() < 0.5)
        stats.add(torch.tensor(rows, dtype=torch.float64).float())
        mine = wanda_keep(torch.tensor(weight), stats.norms(), prune=prune)
        assert mine.tolist() == _wanda_by_hand(weight, rows, prune)


def test_exact_counts_per_layer_row_block_and_group():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(7, 296, generator=g), torch.randn(400, 296, generator=g)
    s = Stats(296, w.device, hessian=True)
    s.add(x)
    for count in (0, 1, 699, 1036, 2071):
        assert int((~magnitude_keep(w, prune=count)).sum()) == count
        keep = wanda_keep(w, s.norms(), prune=count)
        dropped = (~keep).sum(1)
        assert int(dropped.sum()) == count and int(dropped.max() - dropped.min()) <= 1
        result = sparsegpt(w, s.hessian(), prune=count)
        assert int((~result.keep).sum()) == count and torch.equal(result.weight == 0, ~result.keep)
        per_block = [int((~result.keep[:, i:i + 128]).sum()) for i in range(0, 296, 128)]
        assert per_block == block_counts(count, 7, 296, 128)
    for n, m in ((2, 4), (4, 8), (1, 4), (3, 4)):
        for keep in (magnitude_keep(w, pattern=(n, m)), wanda_keep(w, s.norms(), pattern=(n, m)),
                     sparsegpt(w, s.hessian(), pattern=(n, m)).keep):
            assert bool((keep.reshape(7, -1, m).sum(-1) == n).all())


def test_block_counts_split_a_count_exactly():
    assert block_counts(2304, 16, 288, 128) == [1024, 1024, 256]
    assert block_counts(5, 1, 300, 128) == [2, 2, 1]
    assert sum(block_counts(1001, 3, 1000, 128)) == 1001


def test_row_keep_gives_the_extra_weights_to_the_first_rows():
    keep = row_keep(torch.arange(12.0).reshape(3, 4), 5)
    f, t = False, True
    assert keep.tolist() == [[f, f, t, t], [f, f, t, t], [f, t, t, t]]


def test_sparsegpt_loss_is_half_the_damped_hessian_error_and_n_m_ignores_the_blocksize():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 40, generator=g)
    x = torch.randn(200, 40, generator=g) * torch.rand(40, generator=g) * 3
    s = Stats(40, w.device, hessian=True)
    s.add(x)
    h = s.hessian().double()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    for how in ({"prune": 160}, {"pattern": (2, 4)}):
        result = sparsegpt(w, s.hessian(), blocksize=8, **how)
        d = (w - result.weight).double()
        assert result.loss == pytest.approx(float(torch.einsum("ij,jk,ik->", d, h, d)) / 2, rel=1e-5)
    a, b = (sparsegpt(w, s.hessian(), pattern=(2, 4), blocksize=bs).weight for bs in (4, 128))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sparsegpt_without_correlations_is_magnitude_pruning():
    """With H a multiple of I the OBS update moves no kept weight and the score is |w|."""
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    result = sparsegpt(w, torch.eye(32) * 3.0, prune=96)
    assert torch.equal(result.keep, magnitude_keep(w, prune=96))
    assert torch.equal(result.weight, w * result.keep)


def test_sparsegpt_zeroes_inputs_never_seen():
    w, x = torch.randn(4, 8), torch.randn(50, 8)
    x[:, 3] = 0
    s = Stats(8, w.device, hessian=True)
    s.add(x)
    result = sparsegpt(w, s.hessian(), prune=8)
    assert bool((result.weight[:, 3] == 0).all()) and not bool(result.keep[:, 3].any())


@pytest.mark.parametrize(("args", "message"), [
    ({"prune": 3, "pattern": (2, 4)}, "give either prune"),
    ({}, "give either prune"),
    ({"pattern": (2, 3)}, "needs an input size that is a multiple of 3, the layer has 8"),
    ({"prune": 33}, "cannot prune 33 of 32 weights"),
])
def test_solvers_refuse_bad_requests(args, message):
    with pytest.raises(ValueError, match=message):
        magnitude_keep(torch.randn(4, 8), **args)

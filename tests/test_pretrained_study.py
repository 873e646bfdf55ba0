"""analysis.pretrained_study: the grid, the resumable runner on tiny models, and the committed table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from sparseham.analysis import pretrained_study as study
from sparseham.analysis.pretrained_subjects import LlamaSubject, MiniLMSubject, pattern_of
from sparseham.analysis.pretrained_table import ham_entries, ordering, write_table

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs/study/pretrained"


def test_the_grid_names_every_cell_once():
    minilm, llama = study.grid("minilm"), study.grid("llama")
    assert len(minilm) == 3 * 3 * (1 + 2 * 3) and len(llama) == 1 + 3 * 3 * (1 + 4 * 3)
    assert len({c.name for c in minilm + llama}) == len(minilm) + len(llama)
    assert llama[0].name == "llama/dense/0/dense/none/-"
    assert study.Cell("minilm", "wanda", "2:4", "recovery", "distill_ham", 2).name == \
        "minilm/wanda/2:4/recovery/distill_ham/s2"
    assert pattern_of("2:4") == (0.5, (2, 4)) and pattern_of("0.7") == (0.7, None)
    with pytest.raises(ValueError, match="unknown subject 'bert'; choose one of minilm, llama"):
        study.grid("bert")


def _tiny_bert(tmp_path):
    import transformers

    words = "the a of to is and in it for on with as by this that be are or from module class".split()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join([*specials, *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32), add_pooling_layer=False)
    gen = torch.Generator().manual_seed(1)
    sentences = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=gen).tolist())
                 for _ in range(16)]
    return MiniLMSubject(model, tok, sentences[:8], sentences[8:], batch_size=4)


def _tiny_llama():
    import transformers

    from sparseham.models.hf import CausalLM

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False))
    windows = torch.randint(64, (24, 9), generator=torch.Generator().manual_seed(2))
    return LlamaSubject(CausalLM(lm), windows[:20], windows[20:], calib=4, batch_size=2)


@pytest.mark.parametrize("subject, load, arm", [("minilm", _tiny_bert, "distill_ham"),
                                                 ("llama", _tiny_llama, "distill_ham")])
def test_the_runner_writes_a_row_per_cell_and_a_second_run_skips_it(tmp_path, subject, load, arm):
    path = tmp_path / "cells.csv"
    todo = [study.Cell(subject, "wanda", "2:4", "oneshot"),
            study.Cell(subject, "wanda", "2:4", "recovery", arm, 0)]
    built = []

    def loader():
        built.append(1)
        return load(tmp_path) if subject == "minilm" else load()

    assert study.run(subject, path, loader, steps=2, todo=todo, log=lambda s: None) == 2
    rows = list(csv.DictReader(path.open()))
    assert [r["name"] for r in rows] == [c.name for c in todo]
    metric = "cos_mean" if subject == "minilm" else "perplexity"
    assert all(float(r[metric]) > 0 for r in rows) and rows[1]["steps"] == "2" and rows[0]["steps"] == "0"
    assert rows[1]["ham"] == "True" and rows[1]["distill"] == "True" and rows[1]["seed"] == "0"
    assert rows[0]["seed"] == "" and rows[0]["commit"] and rows[0]["cpu"]
    # resumed: nothing left to run, the subject is not even built, the CSV is unchanged
    before = path.read_text()
    assert study.run(subject, path, loader, steps=2, todo=todo, log=lambda s: None) == 0
    assert path.read_text() == before and len(built) == 1


def test_recovery_keeps_the_pruned_weights_zero():
    subject = _tiny_llama()
    model, masks = subject.prune("sparsegpt", "0.5")
    subject.recover(model, masks, distill=False, ham=True, steps=3, seed=1)
    for name, mask in masks.items():
        assert (model.get_parameter(name)[~mask] == 0).all() and (~mask).sum() == mask.numel() // 2


def test_minilm_refuses_an_arm_without_distillation(tmp_path):
    subject = _tiny_bert(tmp_path)
    model, masks = subject.prune("magnitude", "0.5")
    with pytest.raises(ValueError, match="the MiniLM subject recovers by distillation only"):
        subject.recover(model, masks, distill=False, ham=False, steps=1, seed=0)


def _row(method, sparsity, stage, arm, seed, ppl):
    return {"name": f"{method}{sparsity}{stage}{arm}{seed}", "subject": "llama", "method": method,
            "sparsity": sparsity, "stage": stage, "arm": arm, "ham": str(arm in ("ham", "distill_ham")),
            "distill": str(arm.startswith("distill")), "seed": seed, "perplexity": str(ppl)}


def test_the_table_pairs_seeds_and_judges_ordering_and_ham(tmp_path):
    rows = [_row("dense", "0", "dense", "none", "", 8.4)]
    rows += [_row(m, "0.5", "oneshot", "none", "", p) for m, p in
             (("magnitude", 9.5), ("wanda", 9.0), ("sparsegpt", 8.9))]
    for seed, plain, ham in (("0", 8.80, 8.70), ("1", 8.82, 8.70), ("2", 8.81, 8.75)):  # diffs -.1 -.12 -.06
        rows += [_row("wanda", "0.5", "recovery", "plain", seed, plain),
                 _row("wanda", "0.5", "recovery", "ham", seed, ham)]
    (e,) = ham_entries(rows, "perplexity")
    half = 4.302653 * 0.0305505 / 3 ** 0.5  # t(0.975, 2) * std(-.1, -.12, -.06) / sqrt(3)
    assert e["diff"] == pytest.approx(-0.09333333)
    assert e["ci"] == pytest.approx((-0.0933 - half, -0.0933 + half), abs=1e-4)
    path = tmp_path / "cells.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=study.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = write_table(path, tmp_path).read_text()
    assert "Dense: 8.400" in text and "- 0.5: holds" in text and "- 0.7: incomplete" in text
    # arms plain, ham, distill, distill_ham; then ham − plain and distill_ham − distill
    assert ("| wanda | 0.5 | 9.000 | 8.810 ± 0.010 (n=3) | 8.717 ± 0.029 (n=3) |  |  | "
            "-0.093 [-0.169, -0.017] |  |") in text
    assert "- wanda 0.5 ham: helps (n=3)" in text
    assert ordering({"sparsegpt": 0.9, "wanda": 0.95, "magnitude": 0.7}, True) == \
        "does not hold (SparseGPT vs Wanda)"
    assert ordering({"sparsegpt": 9.0, "wanda": 9.0, "magnitude": 9.0}, False) == \
        "does not hold (Wanda vs magnitude)"


def test_the_committed_table_regenerates_from_the_committed_csv(tmp_path):
    generated = write_table(COMMITTED / "cells.csv", tmp_path).read_text()
    committed = (COMMITTED / "table.md").read_text()
    assert generated.replace(str(COMMITTED / "cells.csv"), "CSV") == \
        committed.replace("docs/study/pretrained/cells.csv", "CSV")


def test_the_cli_refuses_a_missing_llama_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["run", "llama", "--csv", str(tmp_path / "c.csv"), "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path}/llama_small/model is missing: build it first" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()

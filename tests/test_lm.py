"""Hugging Face causal LMs in ``sparseham train`` (issue 15): a tiny Llama and GPT-2 built from
configs, byte-level text from the standard library's sources, exact sparsity on the attention
and MLP projections only, a falling loss, perplexity and sign flips in final.json, TensorBoard
and the report."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparseham.analysis import report
from sparseham.cli import train_main
from sparseham.config import load_config
from sparseham.data.text import corpus_files, read_corpus, windows
from sparseham.models import build_causal_lm
from sparseham.train import run
from sparseham.train.checkpoint import load_checkpoint

pytest.importorskip("transformers")

TINY = ["data.text.max_bytes=120000", "data.text.seq_len=32", "data.batch_size=8", "train.max_steps=40",
        "train.eval_every=null", "logging.log_every=10", "logging.progress=false", "checkpoint.every=0",
        "sparsity.rigl.update_every=10",
        "model.hf={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 1, max_position_embeddings: 64}"]


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if e["event"] == kind]


def test_the_stdlib_corpus_is_python_sources_without_tests():
    files = corpus_files("stdlib")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    rows = windows(read_corpus("stdlib", 10_000), 99)
    assert rows.shape == (100, 100) and rows.dtype == torch.uint8


def test_tiny_llama_rigl_ham_trains_from_the_shipped_config(tmp_path):
    cfg = load_config("lm_rigl_ham", TINY)
    assert run(cfg, tmp_path) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    names = list(final["layers"])
    assert len(names) == 14 and all(n.endswith(("_proj.weight",)) for n in names)  # 2 x (4 attn + 3 mlp)
    # The run verified the exact per-layer counts at every log (MaskManager.verify); here the result.
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    kept = sum(int(m.sum()) for m in state["manager"]["masks"])
    total = sum(final["layers"][n]["numel"] for n in names)
    assert abs(1 - kept / total - 0.9) < 1e-4 and final["sparsity"] == pytest.approx(1 - kept / total)
    for name, mask in zip(state["manager"]["names"], state["manager"]["masks"]):
        assert torch.all(state["model"][name][~mask] == 0), name
    losses = [e["loss"] for e in _events(tmp_path, "train")]
    assert losses[-1] < losses[0] - 1.0, losses  # ln 256 = 5.55 at the start
    assert final["test_perplexity"] == pytest.approx(torch.tensor(final["test_loss"]).exp().item(), rel=1e-6)
    assert final["val_perplexity"] is not None and final["tokens_per_s"] > 0
    assert final["flips_unmasked"] > 0 and final["ham"]["enabled"]
    assert "perplexity" in _events(tmp_path, "eval")[-1]
    tb = EventAccumulator(str(tmp_path))
    tb.Reload()
    assert {"flips/all/unmasked", "train/tokens_per_s", "eval/test_perplexity"} <= set(tb.Tags()["scalars"])
    assert report.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert "flip" in (tmp_path / "report" / "report.md").read_text().lower()


def test_gpt2_manages_its_conv1d_projections_not_the_tied_head(tmp_path):
    path = tmp_path / "gpt2.yaml"
    path.write_text("data: {dataset: text}\nmodel: {name: hf:GPT2LMHeadModel, hf: {n_embd: 32, n_layer: 1, "
                    "n_head: 2, n_positions: 64}}\nsparsity: {method: static, target: 0.9}\n")
    sets = [s for s in TINY if not s.startswith(("model.hf", "sparsity.rigl"))] + ["train.max_steps=10"]
    assert run(load_config(path, sets), tmp_path / "run") == 0
    layers = json.loads((tmp_path / "run" / "final.json").read_text())["layers"]
    names = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert sorted(layers) == [f"lm.transformer.h.0.{n}" for n in names]
    kept = sum(v["numel"] * (1 - v["sparsity"]) for v in layers.values())
    assert kept / sum(v["numel"] for v in layers.values()) == pytest.approx(0.1, abs=1e-4)


def test_pretrained_weights_load_from_a_local_directory(tmp_path):
    model = build_causal_lm("LlamaForCausalLM", vocab_size=256, seq_len=32, options={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64})
    model.lm.save_pretrained(tmp_path / "weights")
    loaded = build_causal_lm("LlamaForCausalLM", vocab_size=256, seq_len=32,
                             pretrained=str(tmp_path / "weights"))
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model.eval()(x), loaded.eval()(x))


@pytest.mark.parametrize(("sets", "message"), [
    (["data.dataset=mnist"], "model.name = 'hf:LlamaForCausalLM': a language model needs data.dataset text"),
    (["model.hf.hiden_size=3"], "model.hf: hiden_size not a field of LlamaConfig"),
    (["model.name=hf:BertModel"], "hf:BertModel is not a transformers causal LM class"),
    (["data.text.source=/nonexistent/*.txt"], "data.text.source = '/nonexistent/*.txt' names no files"),
    (["data.text.seq_len=1000"], "takes at most 512 positions, fewer than data.text.seq_len 1000"),
])
def test_bad_lm_settings_give_one_line(tmp_path, capsys, sets, message):
    argv = ["--config", "lm_rigl_ham", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "r")]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()

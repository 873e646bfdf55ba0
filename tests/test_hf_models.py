"""Hugging Face models done right (issue 31): ``model.pretrained`` uses the model's own tokenizer
(or refuses bytes for a vocabulary that is not 256), calibration code gets the app's own token
windows, a run exports as a ``save_pretrained`` directory that plain ``transformers`` reloads with
the same perplexity and exact zeros, and ``sparseham eval`` evaluates runs and directories."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparseham.cli import main, train_main
from sparseham.config import load_config
from sparseham.data import build_data
from sparseham.data.text import corpus_files, read_corpus, split_windows, token_sequences, windows
from sparseham.export import export_run
from sparseham.models.llama_small import train_tokenizer
from sparseham.train.build import text_options

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64}
SETS = ["data.text.max_bytes=60000", "data.text.seq_len=32", "data.batch_size=8", "data.eval_batch_size=64",
        "train.max_steps=6", "logging.log_every=3", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every=0", "sparsity.method=static", "sparsity.target=0.5", "model.hf={}"]


def _save_llama(folder, vocab: int) -> None:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **TINY)).save_pretrained(folder)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer of 300 tokens, as save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    train_tokenizer([bytes(read_corpus("stdlib", 100_000)).decode()], 300, folder)
    _save_llama(folder, 300)
    return folder


def _train(tmp_path, capsys, *sets, name="run"):
    argv = ["--config", "lm_rigl_ham", "--out", str(tmp_path / name)]
    code = train_main(argv + [a for s in [*SETS, *sets] for a in ("--set", s)])
    return code, capsys.readouterr().err.strip()


def test_the_text_is_tokenized_by_the_models_own_tokenizer(pretrained):
    tok = transformers.AutoTokenizer.from_pretrained(pretrained)
    files = corpus_files("stdlib")
    # An independent transcription: every file on its own, no special tokens, ids concatenated.
    ids, size = [], 0
    for path in files:
        data = path.read_bytes()[: 20_000 - size]
        ids += tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        size += len(data)
        if size >= 20_000:
            break
    expected = split_windows(windows(torch.tensor(ids), 16), 0.05)["test"][:, :-1]
    got = token_sequences(pretrained, 16, split="test", max_bytes=20_000)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert got.max() >= 256  # not bytes: the BPE merges are ids past the byte alphabet


def test_calibration_sequences_are_the_training_runs_own_windows(pretrained):
    cfg = load_config("lm_rigl_ham", [*SETS, f"model.pretrained={pretrained}", "data.val_split=0.1"])
    data = build_data("text", batch_size=8, seed=0, val_split=0.1, text=text_options(cfg))
    assert data.info.num_classes == 300
    for split in ("train", "val", "test"):
        rows = getattr(data, split).windows
        got = token_sequences(pretrained, 32, split=split, max_bytes=60_000, val_split=0.1)
        assert torch.equal(got, rows[:, :-1].long()), split


def test_a_pretrained_model_trains_on_its_own_tokens(pretrained, tmp_path, capsys):
    code, err = _train(tmp_path, capsys, f"model.pretrained={pretrained}")
    assert code == 0, err
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    # Its 300 logits score 300 tokens: a byte model would have been refused, not trained.
    assert math.log(final["test_perplexity"]) == pytest.approx(final["test_loss"], rel=1e-6)
    assert final["test_perplexity"] < 300


def test_bytes_for_a_vocabulary_of_256_need_no_tokenizer(tmp_path, capsys):
    _save_llama(tmp_path / "bytes", 256)
    code, err = _train(tmp_path, capsys, f"model.pretrained={tmp_path / 'bytes'}")
    assert code == 0, err


@pytest.mark.parametrize(("setup", "sets", "message"), [
    ("no_tokenizer", [], "has a vocabulary of 300, but the text data are bytes (256 tokens: it holds no "
                        "tokenizer); put the model's tokenizer files in its directory"),
    ("pretrained", ["data.text.tokenizer=bytes"], "has a vocabulary of 300, but the text data are bytes (256 "
                                                  "tokens: data.text.tokenizer = bytes)"),
    ("missing", [], "model.pretrained = '{path}': no such directory; give a local directory written by "
                    "save_pretrained (nothing is downloaded)"),
    ("file", [], "model.pretrained = '{path}' is a file, not a directory"),
    ("empty", [], "model.pretrained = '{path}' is not a model directory (no config.json)"),
    ("bert", [], "model.pretrained = '{path}' holds a 'bert' model, not the 'llama' that LlamaForCausalLM "
                 "loads"),
    ("pretrained", ["data.text.tokenizer={tmp}"], "data.text.tokenizer = '{tmp}' holds no tokenizer"),
])
def test_bad_pretrained_settings_give_one_line(pretrained, tmp_path, capsys, setup, sets, message):
    path = {"pretrained": pretrained, "missing": tmp_path / "nope", "file": tmp_path / "file"}.get(
        setup, tmp_path / setup)
    if setup == "no_tokenizer":
        _save_llama(path, 300)
    elif setup == "file":
        path.write_text("x")
    elif setup == "empty":
        path.mkdir()
    elif setup == "bert":
        transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64).save_pretrained(path)
    sets = [s.format(tmp=tmp_path) for s in sets]
    capsys.readouterr()
    code, err = _train(tmp_path, capsys, f"model.pretrained={path}", *sets)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message.format(path=path, tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists()


# -- export in HF format, and evaluation without training ------------------------------------------
@pytest.fixture(scope="module")
def lm_run(pretrained, tmp_path_factory):
    """A 50%-pruned fine-tuning run of the tiny pretrained Llama."""
    from sparseham.train import run

    folder = tmp_path_factory.mktemp("runs") / "lm"
    assert run(load_config("lm_rigl_ham", [*SETS, f"model.pretrained={pretrained}"]), folder) == 0
    return folder


def _hf_perplexity(lm, rows: torch.Tensor) -> float:
    """Perplexity with transformers' own shifted loss over windows of seq_len + 1 tokens."""
    with torch.no_grad():
        losses = [lm(input_ids=b, labels=b).loss for b in rows.long().split(16)]
    sizes = torch.tensor([len(b) for b in rows.split(16)], dtype=torch.float64)
    return math.exp(float((torch.stack(losses).double() * sizes).sum() / sizes.sum()))


def test_an_hf_export_reloads_in_plain_transformers_with_its_perplexity_and_zeros(lm_run, pretrained,
                                                                                 tmp_path):
    from sparseham.data.text import text_windows
    from sparseham.train.checkpoint import load_checkpoint

    out = tmp_path / "hf"
    export_run(lm_run, out, "hf")
    lm = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    state = load_checkpoint(lm_run / "checkpoint.pt")
    reloaded = lm.state_dict()
    assert sorted(reloaded) == sorted(k.removeprefix("lm.") for k in state["model"])
    names, masks = state["manager"]["names"], state["manager"]["masks"]
    assert len(names) == 14
    for name, mask in zip(names, masks):
        weight = reloaded[name.removeprefix("lm.")]
        assert torch.equal(weight == 0, ~mask), name  # exactly the pruned weights are zero
    final = json.loads((lm_run / "final.json").read_text())
    rows = text_windows(out, 32, split="test", max_bytes=60_000)
    assert _hf_perplexity(lm, rows) == pytest.approx(final["test_perplexity"], rel=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("def f(x):\n", add_special_tokens=False) == transformers.AutoTokenizer.from_pretrained(
        pretrained).encode("def f(x):\n", add_special_tokens=False)


def test_sparseham_eval_gives_a_runs_perplexity_for_the_run_and_its_export(lm_run, tmp_path, capsys):
    final = json.loads((lm_run / "final.json").read_text())
    assert main(["export", str(lm_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    for target in (lm_run, tmp_path / "hf"):
        capsys.readouterr()
        assert main(["eval", str(target), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["perplexity"] == pytest.approx(final["test_perplexity"], rel=1e-5), target
        assert result["accuracy"] == pytest.approx(final["test_acc"], abs=1e-9)
    assert main(["eval", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'hf'}: test perplexity ")
    for target in (lm_run, tmp_path / "hf"):  # the validation block of the run's data.val_split
        assert main(["eval", str(target), "--split", "val", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["perplexity"] == pytest.approx(final["val_perplexity"], rel=1e-5), target


def test_gpt2s_tied_head_exports_and_reloads(tmp_path):
    from sparseham.train import run
    from sparseham.train.checkpoint import load_checkpoint

    config = tmp_path / "gpt2.yaml"
    config.write_text("data: {dataset: text}\nmodel: {name: hf:GPT2LMHeadModel, hf: {n_embd: 32, n_layer: 1, "
                      "n_head: 2, n_positions: 64}}\n")
    assert run(load_config(config, [s for s in SETS if s != "model.hf={}"]), tmp_path / "run") == 0
    export_run(tmp_path / "run", tmp_path / "hf", "hf")
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for key, value in lm.state_dict().items():
        assert torch.equal(value, state["lm." + key]), key


def test_sparseham_eval_gives_a_classifiers_accuracy(tmp_path, capsys):
    from sparseham.train import run

    sets = ["data.dataset=synthetic", "model.name=lenet5", "data.batch_size=64", "train.max_steps=8",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]
    assert run(load_config("rigl", sets), tmp_path / "run") == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == final["test_acc"] and "perplexity" not in result
    assert result["loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "trained lenet5; format hf needs an hf: language model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["{tmp}/nope"], "{tmp}/nope: no such directory; give a run directory or a save_pretrained one"),
    (["{tmp}"], "{tmp} is neither a run directory (config.yaml) nor a save_pretrained directory"),
    (["{tmp}/bert"], "model = '{tmp}/bert' holds BertModel, which does not load as a causal LM"),
    (["{pre}", "--split", "val"], "the val split of the text is empty; use --split test"),
    (["{hf}", "--seq-len", "0"], "--seq-len 0: expected an int >= 1"),
    (["{hf}", "--test-fraction", "1.5"], "--test-fraction 1.5: expected a fraction in (0, 1)"),
    (["{hf}", "--source", "{tmp}/none*.txt"], "data.text.source = '{tmp}/none*.txt' names no files"),
    (["{hf}", "--split", "train"], "argument --split: invalid choice: 'train'"),
])
def test_eval_errors_are_one_line(lm_run, pretrained, tmp_path, capsys, args, message):
    transformers.BertModel(transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(tmp_path / "bert")
    if "{hf}" in args:
        export_run(lm_run, tmp_path / "hf", "hf")
    capsys.readouterr()
    fill = {"tmp": tmp_path, "pre": pretrained, "hf": tmp_path / "hf"}
    assert main(["eval", *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(**fill) in err, err


def test_export_hf_refuses_an_existing_out(lm_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(lm_run), "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "--out {} exists; give a new directory".format(tmp_path / "taken") in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial copy left beside it
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_the_llama_subject_builds_resumably_into_a_plain_transformers_directory(tmp_path, capsys):
    from sparseham.models.llama_small import build_llama_small
    from sparseham.models.llama_small import main as build_main

    small = ["data.text.max_bytes=40000", "data.text.seq_len=32", "data.batch_size=4", "train.max_steps=3",
             "model.hf.hidden_size=32", "model.hf.intermediate_size=64", "model.hf.num_hidden_layers=1",
             "model.hf.num_attention_heads=2", "model.hf.num_key_value_heads=2", "checkpoint.every=0"]
    model = build_llama_small(tmp_path, overrides=small, progress=False)
    assert model == tmp_path / "llama_small" / "model"
    lm = transformers.AutoModelForCausalLM.from_pretrained(model)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: exact round trip
    assert lm.config.vocab_size == len(tok) > 256
    assert json.loads((model / "sparseham.json").read_text())["text"]["seq_len"] == 32
    capsys.readouterr()
    assert build_main(["--root", str(tmp_path)]) == 0  # found: nothing is trained again
    assert capsys.readouterr().out.strip() == str(model)

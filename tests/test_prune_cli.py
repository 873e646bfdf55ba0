"""``sparseham prune`` (sparseham/train/prune.py): a saved tiny LLaMA or GPT-2 pruned with calibration
text, written as a directory plain transformers loads; bad input gets one line, exit 2 and nothing
written; an interrupted prune leaves no output directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sparseham.train import prune as prune_cli

transformers = pytest.importorskip("transformers")
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 300
SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2"]


def _llama(vocab: int = 256):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture
def saved(tmp_path):
    _llama().save_pretrained(tmp_path / "llama")
    (tmp_path / "text.py").write_text(TEXT)
    return tmp_path


def _run(argv, capsys):
    code = prune_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("method", "sparsity"), [("wanda", "2:4"), ("sparsegpt", "0.5"),
                                                  ("magnitude", "4:8")])
def test_prune_writes_a_directory_plain_transformers_loads(saved, capsys, method, sparsity):
    out = saved / "out"
    code, stdout, _ = _run([saved / "llama", "--method", method, "--sparsity", sparsity, "--calib",
                            saved / "text.py", *SMALL, "--out", out], capsys)
    assert code == 0
    assert stdout.startswith("managing 14 tensors (73,728 weights)") and "skipped lm_head.weight" in stdout
    assert f"with {method} to sparsity 0.5000 on 4 windows of 32 tokens" in stdout
    record = json.loads((out / "prune.json").read_text())
    assert record["calibration_windows"] == 4 and record["held_out_windows"] == 2
    assert record["perplexity_after"] > 1 and record["perplexity_before"] > 1
    from safetensors.torch import load_file

    masks = load_file(out / "masks.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(masks) == 14 and "lm_head.weight" not in masks
    m = int(sparsity.split(":")[1]) if ":" in sparsity else None
    for name, mask in masks.items():
        assert torch.equal(model.get_parameter(name) != 0, mask), name
        if m:
            assert bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == m // 2).all()), name
        else:
            assert int(mask.sum()) * 2 == mask.numel(), name
    assert sorted(p.name for p in saved.iterdir()) == ["llama", "out", "text.py"]  # no leftovers


def test_the_models_own_tokenizer_tokenizes_the_calibration_text(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    _llama(vocab=len(fast)).save_pretrained(tmp_path / "llama")
    fast.save_pretrained(tmp_path / "llama")
    (tmp_path / "text.py").write_text(TEXT)
    code, stdout, _ = _run([tmp_path / "llama", "--method", "wanda", "--sparsity", "0.5", "--calib",
                            tmp_path / "text.py", *SMALL, "--out", tmp_path / "out"], capsys)
    assert code == 0 and "held-out perplexity (2 windows)" in stdout
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def _vit(path):
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64).save_pretrained(path)


def _set(argv, flag, value):
    argv[argv.index(flag) + 1] = value


@pytest.mark.parametrize(("change", "message"), [
    (lambda d, a: a.__setitem__(0, d), r"is not a model directory \(no config.json"),
    (lambda d, a: ((d / "tiny.txt").write_text("x = 1\n"), _set(a, "--calib", d / "tiny.txt")),
     r"holds 6 tokens, shorter than one window of --seqlen 32"),
    (lambda d, a: _set(a, "--sparsity", "3:7"),
     r"pattern 3:7 needs an input size that is a multiple of 7: model.layers.0.self_attn.q_proj.weight"),
    (lambda d, a: _set(a, "--sparsity", "1.0"), r"--sparsity 1.0 is outside \[0, 1\)"),
    (lambda d, a: _set(a, "--sparsity", "-0.2"), r"--sparsity -0.2 is outside \[0, 1\)"),
    (lambda d, a: _set(a, "--sparsity", "half"), "--sparsity 'half' is not a number"),
    (lambda d, a: (_vit(d / "vit"), a.__setitem__(0, d / "vit")),
     "model type 'vit' is not a causal language model"),
    (lambda d, a: (_llama(vocab=300).save_pretrained(d / "big"), a.__setitem__(0, d / "big")),
     "has no tokenizer and a vocabulary of 300, not the 256 bytes"),
    (lambda d, a: (d / "out").mkdir(), "exists; choose a new directory"),
    (lambda d, a: _set(a, "--nsamples", "0"), "--nsamples must be >= 1"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(saved, capsys, change, message):
    argv = [saved / "llama", "--method", "wanda", "--sparsity", "0.5", "--calib", saved / "text.py", *SMALL,
            "--out", saved / "out"]
    change(saved, argv)
    existed = (saved / "out").exists()
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("sparseham prune: error: ")
    assert re.search(message, err), err
    assert (saved / "out").exists() == existed and not list(saved.glob(".out*"))


def test_an_interrupted_prune_leaves_no_output_directory(saved, monkeypatch):
    import safetensors.torch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_cli.main([str(saved / "llama"), "--method", "magnitude", "--sparsity", "0.5", "--calib",
                        str(saved / "text.py"), *SMALL, "--out", str(saved / "out")])
    assert sorted(p.name for p in saved.iterdir()) == ["llama", "text.py"]


@pytest.mark.slow
def test_the_sparseham_command_runs_prune_in_a_real_process(saved):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sparseham", "prune", str(saved / "llama"), "--method", "sparsegpt",
               "--sparsity", "2:4", "--calib", str(saved / "text.py"), *SMALL]
    ok = subprocess.run([*command, "--out", str(saved / "out")], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0 and "wrote" in ok.stdout and ok.stderr == "", ok.stderr
    bad = subprocess.run([*command, "--out", str(saved / "out")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "exists" in bad.stderr

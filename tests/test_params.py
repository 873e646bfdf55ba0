"""Tests for sparseham/params.py: which parameters the library manages by default (issue 31's
Hugging Face defaults, issue 33 item 3's tied weights) and the one line that says so."""

import pytest
import torch
from torch import nn

from sparseham import MaskManager, methods, prunable_parameters
from sparseham.params import managed_summary

transformers = pytest.importorskip("transformers")


def _names(model, **kwargs):
    return [n for n, _ in prunable_parameters(model, **kwargs)]


def test_gpt2_manages_its_conv1d_projections_never_the_tied_head():
    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
    assert _names(model) == [f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")]
    assert managed_summary(model) == (
        "managing 4 tensors (12,288 weights): transformer.h.0.attn.c_attn.weight, "
        "transformer.h.0.attn.c_proj.weight, transformer.h.0.mlp.c_fc.weight, ... (1 more); "
        "skipped lm_head.weight (LM head)")


def test_an_untied_llama_head_is_skipped_and_embeddings_and_norms_need_include():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    names = _names(model)
    assert len(names) == 7 and not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    assert _names(model, include=["*embed_tokens*", "*norm*"]) == [
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
    assert _names(model, include=["lm_head.weight"]) == ["lm_head.weight"]  # asked for: managed


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_tensor_shared_by_two_layers_is_managed_once_and_said_so():
    model = _Tied()
    assert _names(model) == ["a.weight", "c.weight"]
    assert _names(model, include=["*.weight"]) == ["a.weight", "c.weight"]
    assert managed_summary(model) == ("managing 2 tensors (140 weights): a.weight, c.weight; "
                                      "tied: b.weight = a.weight")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mm = MaskManager(model, opt, methods.get("static")(0.8, init="magnitude"))
    mm.verify()  # one mask on the shared tensor: the counts and the zeros agree
    assert mm.sparsity() == pytest.approx(0.8, abs=0.01)


def test_a_head_tied_to_an_embedding_outside_transformers_is_skipped():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20))
    model[2].weight = model[0].weight
    assert _names(model) == ["1.weight"]
    assert managed_summary(model).endswith("skipped 2.weight (tied to an embedding)")

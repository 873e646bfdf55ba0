"""Prune a trained language model in one shot with Wanda, then fine-tune it with HAM keeping the mask.

    pip install -c constraints.txt '.[hf]'
    python examples/prune_pretrained.py          # 150 steps of pre-training, 100 of fine-tuning
    SPARSEHAM_EXAMPLE_SMALL=1 python examples/prune_pretrained.py   # 20 and 10, what the tests run

A stand-in for a downloaded checkpoint: a tiny Llama built from its config and trained briefly on
byte-level text (this Python's own standard-library sources). With a real model, load it with
``AutoModelForCausalLM.from_pretrained(DIR)`` and take calibration batches from its own data.
"""

import itertools
import math
import os
import sysconfig
import tempfile
from pathlib import Path

import torch
import transformers

from sparseham import HAM, MaskManager, methods

SMALL = os.environ.get("SPARSEHAM_EXAMPLE_SMALL") == "1"
PRETRAIN, FINETUNE, SEQ = (20, 10, 32) if SMALL else (150, 100, 64)

stdlib = Path(sysconfig.get_paths()["stdlib"])
names = ("bisect.py", "heapq.py", "colorsys.py", "textwrap.py")
text = b"".join((stdlib / name).read_bytes() for name in names)
ids = torch.tensor(list(text[: len(text) // SEQ * SEQ]), dtype=torch.long).view(-1, SEQ)
g = torch.Generator().manual_seed(0)
ids = ids[torch.randperm(len(ids), generator=g)]
held, train = ids[:16], ids[16:]
batches = [train[i:i + 8] for i in range(0, len(train) - 7, 8)]


def perplexity(model) -> float:
    model.eval()
    with torch.no_grad():
        return math.exp(float(model(held, labels=held).loss))


def fit(model, step, steps: int) -> None:
    model.train()
    for x in itertools.islice(itertools.cycle(batches), steps):
        model(x, labels=x).loss.backward()
        step()


torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
model = transformers.LlamaForCausalLM(config)
adam = torch.optim.AdamW(model.parameters(), lr=3e-3)
fit(model, lambda: (adam.step(), adam.zero_grad()), PRETRAIN)
print(f"dense model:       perplexity {perplexity(model):.2f}")

# 1. One-shot Wanda at 50% per layer, calibrated on 4 batches: the manager's set-up prunes the model
#    (pruned weights become exactly 0) and keeps that mask from then on.
opt = HAM(torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=20.0)
mm = MaskManager(model, opt, methods.get("wanda")(target=0.5), data=batches[:4])
print(f"after Wanda 50%:   perplexity {perplexity(model):.2f} "
      f"({len(mm.names)} projections managed, sparsity {mm.sparsity():.3f})")

# 2. Recovery fine-tuning with HAM; mm.step() keeps every pruned weight (and its optimizer state) at 0.
fit(model, lambda: (mm.step(), opt.zero_grad()), FINETUNE)
mm.verify()
print(f"after fine-tuning: perplexity {perplexity(model):.2f} (sparsity {mm.sparsity():.3f})")

# 3. Save with plain transformers; the zeros are the mask. To fine-tune later, reload it and keep
#    the zeros as the mask with the static method's init "existing".
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp)
opt = HAM(torch.optim.AdamW(again.parameters(), lr=1e-3), alpha=20.0)
kept = MaskManager(again, opt, methods.get("static")(target=0.5, init="existing"))
assert all(torch.equal(a, b) for a, b in zip(kept.masks, mm.masks))
print("reloaded: the same mask, ready for more fine-tuning")

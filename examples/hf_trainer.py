"""A tiny Llama (built from a config: no download) trained with RigL + HAM in a Hugging Face Trainer.

    pip install -c constraints.txt '.[hf]'
    python examples/hf_trainer.py          # 60 steps
    SPARSEHAM_EXAMPLE_SMALL=1 python examples/hf_trainer.py   # 6 steps, what the tests run

The text is byte-level: a few of this Python's own standard-library sources.
"""

import os
import sysconfig
import tempfile
from pathlib import Path

import torch
import transformers

from sparseham import SignFlipTracker, methods
from sparseham.integrations.hf import SparseTrainer

SMALL = os.environ.get("SPARSEHAM_EXAMPLE_SMALL") == "1"
STEPS, SEQ = (6, 32) if SMALL else (60, 64)


class Bytes(torch.utils.data.Dataset):
    """Sequences of ``SEQ`` bytes of text; the labels are the inputs (the model shifts them)."""

    def __init__(self, text: bytes) -> None:
        ids = torch.tensor(list(text[: len(text) // SEQ * SEQ]), dtype=torch.long)
        self.ids = ids.view(-1, SEQ)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


stdlib = Path(sysconfig.get_paths()["stdlib"])
text = b"".join((stdlib / name).read_bytes() for name in ("bisect.py", "heapq.py", "colorsys.py"))
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
model = transformers.LlamaForCausalLM(config)

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=max(1, STEPS // 3),
                                          save_steps=STEPS, report_to=[], use_cpu=True, disable_tqdm=True,
                                          seed=0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=Bytes(text),
                            method=methods.get("rigl")(target=0.9, update_every=max(2, STEPS // 4)),
                            ham={"alpha": 20.0, "beta": 1e-3}, tracker=SignFlipTracker())
    trainer.train()  # later: trainer.train(resume_from_checkpoint=True) continues from the last checkpoint
    assert (Path(out) / f"checkpoint-{STEPS}" / "sparseham.pt").is_file()  # the manager's state travels along

mm = trainer.mask_manager
mm.verify()
print(f"managed {len(mm.names)} projections (no embeddings, norms or LM head), sparsity {mm.sparsity():.3f}")
print("last log:", {k: v for k, v in trainer.state.log_history[-2].items() if k in ("loss", "sparsity",
                                                                                       "flips_unmasked")})

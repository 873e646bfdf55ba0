"""RigL + HAM in Lightning, as a callback: its state is saved in every Lightning checkpoint.

    pip install -c constraints.txt '.[lightning]'
    python examples/lightning_callback.py          # 5 epochs
    SPARSEHAM_EXAMPLE_SMALL=1 python examples/lightning_callback.py   # 1 epoch, what the tests run
"""

import os

import lightning
import torch
from torch import nn

from sparseham import SignFlipTracker, methods
from sparseham.integrations.lightning import SparseCallback

EPOCHS = 1 if os.environ.get("SPARSEHAM_EXAMPLE_SMALL") == "1" else 5


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 32, generator=g)
        y = (x[:, :10] * 3).argmax(1)  # a learnable rule: the largest of the first 10 inputs
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


torch.manual_seed(0)
sparse = SparseCallback(methods.get("rigl")(target=0.9, update_every=8), ham={"alpha": 20.0},
                        tracker=SignFlipTracker())
trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=4, callbacks=[sparse])
trainer.fit(Classifier())  # resume: trainer.fit(module, ckpt_path="path/to.ckpt")

mm = sparse.mask_manager
mm.verify()
print(f"sparsity {mm.sparsity():.3f}, optimizer steps {mm.step_count}, "
      f"loss {float(trainer.callback_metrics['train_loss']):.3f}")

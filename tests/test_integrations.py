"""The Hugging Face Trainer and Lightning integrations, with the real libraries, on tiny randomly
initialised models (no downloads): RigL + HAM trains, and a resume from the framework's own
checkpoint ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparseham import SignFlipTracker, methods

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")


# -- Hugging Face ---------------------------------------------------------------------------------
def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 96, length: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_trainer(out, **overrides):
    from sparseham.integrations.hf import SparseTrainer

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
        save_steps=6, logging_steps=3, report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, **overrides)
    method = methods.get("rigl")(0.9, update_every=4, end=0.9)
    return SparseTrainer(model=_tiny_llama(), args=args, train_dataset=_Tokens(), method=method,
                         ham={"alpha": 20.0, "beta": 1e-3, "clamp": 0.05}, tracker=SignFlipTracker())


def test_hf_trainer_runs_the_pipeline_and_resumes_bit_identically(tmp_path):
    whole = _hf_trainer(tmp_path / "whole")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the optimizer was stepped outside")
        whole.train()
    mm = whole.mask_manager
    # 12 Trainer steps; RigL's reference updates at optimizer steps 0, 4 and 8 are iterations of their own.
    assert mm.step_count == 9 and len(mm.mask_events) == 4  # set-up, then the 3 updates
    mm.verify()
    assert abs(mm.sparsity() - 0.9) < 1e-3
    # The library's defaults know a transformer (issue 31): never the LM head or the embeddings.
    assert "lm_head.weight" not in mm.names and not any("embed" in n for n in mm.names)
    logged = [r for r in whole.state.log_history if "loss" in r]
    assert len(logged) == 4 and all({"sparsity", "flips_masked", "flips_unmasked"} <= set(r) for r in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]

    resumed = _hf_trainer(tmp_path / "whole")  # the same output_dir: its checkpoint-6
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-6"))
    assert resumed.mask_manager.step_count == 9
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(mm.masks, resumed.mask_manager.masks))
    assert mm.tracker.read() == resumed.mask_manager.tracker.read()


# -- Lightning ------------------------------------------------------------------------------------
class _Module(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(5)
        data = torch.utils.data.TensorDataset(torch.randn(48, 32, generator=g),
                                              torch.randint(0, 10, (48,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(root, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sparseham.integrations.lightning import SparseCallback

    sparse = SparseCallback(methods.get("rigl")(0.9, update_every=4, end=0.9),
                            ham={"alpha": 20.0, "beta": 1e-3, "clamp": 0.05}, tracker=SignFlipTracker())
    saver = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                                log_every_n_steps=3, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[sparse, saver], default_root_dir=root)
    module = _Module()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the optimizer was stepped outside")
        trainer.fit(module, ckpt_path=ckpt_path)
    return module, sparse.mask_manager, trainer


def test_lightning_callback_runs_the_pipeline_and_resumes_bit_identically(tmp_path):
    module, mm, trainer = _fit(tmp_path)
    assert mm.step_count == 9 and trainer.global_step == 12 and len(mm.mask_events) == 4
    mm.verify()
    assert abs(mm.sparsity() - 0.9) < 1e-3
    assert {"sparsity", "flips_masked", "flips_unmasked"} <= set(trainer.callback_metrics)
    first_epoch = sorted(tmp_path.glob("epoch=0-*.ckpt"))[0]
    resumed, mm2, _ = _fit(tmp_path / "again", ckpt_path=first_epoch)
    assert mm2.step_count == 9
    for (name, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(mm.masks, mm2.masks))
    assert mm.tracker.read() == mm2.tracker.read()

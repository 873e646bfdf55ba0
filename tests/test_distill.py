"""Knowledge distillation (issue 31): the loss is (1 - w) * task + w * T^2 * KL(teacher || student),
checked against an independent float64 transcription, Hinton et al.'s gradient T * (q - p), and in
the app and ``SparseTrainer`` by the gradients and losses they produce."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sparseham.cli import train_main
from sparseham.distill import distillation_loss, kl_to_teacher

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64}
SETS = ["data.text.max_bytes=30000", "data.text.seq_len=32", "data.batch_size=4", "train.max_steps=4",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0", "sparsity.method=static",
        "sparsity.target=0.5", "sparsity.init=magnitude", "model.hf={}", "distill.enabled=true",
        "distill.temperature=3.0", "distill.weight=0.4"]


def _reference(student, teacher, task, temperature, weight, mask=None):
    """Written out from Hinton et al. (2015), row by row, in float64."""
    s, t = student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    keep = [True] * len(s) if mask is None else mask.reshape(-1).tolist()
    total, rows = 0.0, 0
    for i in range(len(s)):
        if not keep[i]:
            continue
        zs, zt = [v / temperature for v in s[i].tolist()], [v / temperature for v in t[i].tolist()]
        log_ns, log_nt = math.log(sum(map(math.exp, zs))), math.log(sum(map(math.exp, zt)))
        total += sum(math.exp(b - log_nt) * ((b - log_nt) - (a - log_ns)) for a, b in zip(zs, zt))
        rows += 1
    return (1 - weight) * task + weight * temperature**2 * total / max(rows, 1)


@pytest.mark.parametrize(("temperature", "weight", "masked"), [(1.0, 0.5, False), (2.0, 0.3, True),
                                                               (4.0, 1.0, False), (0.5, 0.0, True)])
def test_the_loss_is_the_formula(temperature, weight, masked):
    g = torch.Generator().manual_seed(int(temperature * 10 + weight * 100))
    student, teacher = torch.randn(3, 5, 7, generator=g) * 3, torch.randn(3, 5, 7, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.4 if masked else None
    got = distillation_loss(torch.tensor(1.7), student, teacher, temperature=temperature, weight=weight,
                            mask=mask)
    assert got.item() == pytest.approx(_reference(student, teacher, 1.7, temperature, weight, mask), rel=1e-5)


def test_the_gradient_is_t_times_q_minus_p():
    # Hinton et al. (2015), eq. 2: d(KL)/dz_i = (q_i - p_i) / T, so T^2 * KL has T * (q - p), per row.
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 10, generator=g, requires_grad=True), torch.randn(6, 10, generator=g)
    kl_to_teacher(student, teacher, temperature=2.5).backward()
    q, p = F.softmax(student.detach() / 2.5, -1), F.softmax(teacher / 2.5, -1)
    torch.testing.assert_close(student.grad, 2.5 * (q - p) / 6)


def test_invariants():
    logits = torch.randn(4, 9)
    assert kl_to_teacher(logits, logits.clone(), 2.0).abs().item() < 1e-6
    assert distillation_loss(torch.tensor(3.0), logits, logits + 1, temperature=2.0, weight=0.0).item() == 3.0
    # Teacher gradients never flow: the teacher is a constant of the loss.
    teacher = torch.randn(4, 9, requires_grad=True)
    kl_to_teacher(logits.requires_grad_(), teacher, 1.0).backward()
    assert teacher.grad is None


@pytest.mark.parametrize(("call", "message"), [
    (lambda: kl_to_teacher(torch.zeros(2, 3), torch.zeros(2, 4)), r"student logits \(2, 3\) and teacher "
                                                                   r"logits \(2, 4\) differ in shape"),
    (lambda: kl_to_teacher(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature = 0.0; expected > 0"),
    (lambda: distillation_loss(torch.tensor(0.0), torch.zeros(1, 2), torch.zeros(1, 2), temperature=1.0,
                               weight=1.5), r"weight = 1.5; expected a mixing weight in \[0, 1\]"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- in the app ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=256, **TINY)).save_pretrained(folder)
    return folder


def test_the_app_backpropagates_the_distilled_loss(pretrained, tmp_path):
    from sparseham.config import load_config
    from sparseham.train.trainer import Trainer

    trainer = Trainer(load_config("lm_rigl_ham", [*SETS, f"model.pretrained={pretrained}"]), tmp_path)
    x, y = next(iter(trainer.data.train.epoch(0)))
    records = trainer._backward([(x, y)])
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    # Independently: the pruned student and the dense model from the directory as teacher.
    student = copy.deepcopy(trainer.model.lm)
    student.zero_grad()
    teacher = transformers.LlamaForCausalLM.from_pretrained(pretrained).eval()
    logits = student(input_ids=x).logits.reshape(-1, 256)
    task = F.cross_entropy(logits, y)
    assert records[0][0].item() == pytest.approx(task.item(), rel=1e-6)  # the logged loss is the task's
    with torch.no_grad():
        teacher_logits = teacher(input_ids=x).logits.reshape(-1, 256)
    reference = _reference(logits.detach(), teacher_logits, task.item(), 3.0, 0.4)
    assert reference > 0.6 * task.item() + 1e-4  # the pruned student differs from its teacher
    probs_s, probs_t = F.softmax(logits / 3.0, -1), F.softmax(teacher_logits / 3.0, -1)
    kl = (probs_t * (probs_t.log() - probs_s.log())).sum(-1).mean() * 9.0
    (0.6 * task + 0.4 * kl).backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(got["lm." + name], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("sets", "message"), [
    (["model.pretrained=null"], "distill.enabled = true: the teacher is the model as loaded before pruning, "
                                "so it needs model.pretrained"),
    (["distill.weight=1.5"], "distill.weight = 1.5: a mixing weight is in [0, 1]"),
    (["distill.temperature=0"], "distill.temperature = 0.0: must be > 0"),
    (["train.distributed=fsdp"], "distill.enabled keeps a whole teacher on every process"),
])
def test_bad_distill_settings_give_one_line(pretrained, tmp_path, capsys, sets, message):
    argv = ["--config", "lm_rigl_ham", "--out", str(tmp_path / "r")]
    argv += [a for s in [*SETS, f"model.pretrained={pretrained}", *sets] for a in ("--set", s)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


# -- in SparseTrainer ------------------------------------------------------------------------------
def _sparse_trainer(tmp_path, model, teacher, **args):
    from sparseham import methods
    from sparseham.integrations.hf import SparseTrainer

    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": i, "labels": i, "attention_mask": torch.ones(12, dtype=torch.long)} for i in ids]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, **args)
    return SparseTrainer(model=model, args=arguments, train_dataset=data,
                         method=methods.get("static")(0.5, init="magnitude"), ham={}, teacher=teacher,
                         distill_temperature=2.0, distill_weight=0.3), data


def _tiny(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, **TINY))


def test_sparse_trainer_mixes_the_kl_to_its_teacher(tmp_path):
    student, teacher = _tiny(0), _tiny(1)
    trainer, data = _sparse_trainer(tmp_path, student, teacher)
    batch = {k: torch.stack([d[k] for d in data[:4]]) for k in data[0]}
    batch["attention_mask"][:, -3:] = 0
    got = trainer.compute_loss(student, batch)
    task = student(**batch).loss
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
    mask = batch["attention_mask"].bool()
    assert got.item() == pytest.approx(_reference(s, t, task.item(), 2.0, 0.3, mask), rel=1e-5)
    # Under gradient accumulation with a loss the model already scaled, the KL takes the same share.
    trainer.current_gradient_accumulation_steps = 2
    half = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(4 * 11))
    scaled = student(**batch, num_items_in_batch=torch.tensor(4 * 11)).loss
    kl = (_reference(s, t, 0.0, 2.0, 1.0, mask)) / 2
    assert half.item() == pytest.approx(0.7 * scaled.item() + 0.3 * kl, rel=1e-5)


def test_sparse_trainer_with_a_teacher_keeps_the_mask(tmp_path):
    student = _tiny(0)
    teacher = copy.deepcopy(student)
    trainer, _ = _sparse_trainer(tmp_path, student, teacher)
    trainer.train()
    mm = trainer.mask_manager
    mm.verify()
    assert trainer.state.global_step == 4 and mm.sparsity() == pytest.approx(0.5, abs=1e-3)
    for name, p, mask in zip(mm.names, mm.params, mm.masks):
        assert torch.all(p[~mask] == 0) and not torch.equal(p[mask], teacher.get_parameter(name)[mask]), name
    assert all(not p.requires_grad for p in teacher.parameters())  # the teacher stays frozen

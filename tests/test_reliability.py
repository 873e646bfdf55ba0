"""Reliability: bad input gets a clear error, faults lose nothing, a kill never corrupts a run.

Most failures are provoked for real: files are damaged on disk, a forward hook returns NaN, a
gradient hook writes inf, the child process is SIGKILLed or hits RLIMIT_FSIZE. Training runs in
the test process (``Trainer``, ``train.main``) where that is enough, and in ``train.py``
subprocesses where the exit status, a clean stderr or a real kill matter.
"""

import contextlib
import copy
import errno
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_checkpoint import flip_payload_byte
from torch import nn

import sparseham.methods  # noqa: F401  (registers the built-in methods)
import sparseham.train.trainer as trainer_module
from sparseham import HAM
from sparseham.cli import train_main
from sparseham.config import load_config
from sparseham.masks import MaskInvariantError, MaskManager
from sparseham.train.checkpoint import load_checkpoint
from sparseham.train.run_dir import check_final_sparsity, prepare_run_dir, write_atomic
from sparseham.train.trainer import Trainer, TrainingStopped

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/default.yaml"

# In-process runs: 16 steps an epoch, 12 steps, logs every 4.
FAST = [
    "data.dataset=synthetic",
    "model.name=lenet300",
    "data.batch_size=32",
    "data.synthetic.train_size=512",
    "data.synthetic.test_size=128",
    "optim.lr=0.05",
    "ham.alpha=20",
    "train.max_steps=12",
    "logging.log_every=4",
    "logging.tensorboard=false",
    "logging.progress=false",
    "checkpoint.every=0",
]
# Subprocess runs: 32 steps an epoch, a checkpoint every 5 steps, a progress line every step.
RUN = [
    "data.dataset=synthetic",
    "model.name=lenet300",
    "data.batch_size=64",
    "optim.lr=0.05",
    "ham.alpha=20",
    "sparsity.rigl.update_every=15",
    "train.max_steps=150",
    "logging.log_every=1",
    "logging.tensorboard=false",
    "checkpoint.every=5",
    "checkpoint.keep=3",
]
TOTAL = 150


def command(out, sets, config=CONFIG, extra=()):
    cmd = [sys.executable, "train.py", "--config", str(config), "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def one_line_error(err: str) -> str:
    """The single stderr line of a failed run (no traceback), without its ``error: `` prefix."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), err
    return lines[0][len("error: ") :]


def main(capsys, *argv):
    """``sparseham train`` in this process: the exit status and the captured stdout and stderr."""
    code = train_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sets_argv(sets):
    return [x for s in sets for x in ("--set", s)]


def model_state(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of ``RUN``; interrupted and damaged runs must end with its weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert trainer_module.run(load_config(CONFIG, RUN), out) == 0
    return out


# Logs every 3 steps and checkpoints every 5: at most checkpoints, records are pending (HAM's
# clamp counts, mask changes) and must survive a kill.
SPARSE_LOGS = [*RUN, "logging.log_every=3"]


@pytest.fixture(scope="module")
def reference_sparse_logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_sparse_logs") / "run"
    assert trainer_module.run(load_config(CONFIG, SPARSE_LOGS), out) == 0
    return out


def copy_run(src, dst):
    """Copy a run directory keeping ``checkpoint.pt`` a hard link to its numbered file."""
    shutil.copytree(src, dst)
    (dst / "checkpoint.pt").unlink()
    newest = max(dst.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    os.link(newest, dst / "checkpoint.pt")
    return dst


# -- 1. bad configs -----------------------------------------------------------------------------
CONFIG_ERRORS = {
    "unknown key": ("typo.yaml", [], ["typo.yaml: unknown key 'ham.alpah'", "did you mean 'ham.alpha'?"]),
    "wrong type in a file": ("lr.yaml", [], ["lr.yaml: optim.lr = 'fast': expected a float"]),
    "wrong type": (CONFIG, ["train.epochs=[1]"], ["--set: train.epochs = [1]: expected a float"]),
    "sparsity 1.0": (CONFIG, ["sparsity.target=1.0"], ["sparsity.target = 1.0: must be in [0, 1)"]),
    "negative lr": (CONFIG, ["optim.lr=-0.1"], ["optim.lr = -0.1: must be > 0"]),
    "clamp 0": (CONFIG, ["ham.clamp=0"], ["ham.clamp = 0.0: must be > 0"]),
    "unknown method": (
        CONFIG,
        ["sparsity.method=rigll"],
        ["'rigll': unknown method; did you mean 'rigl'?", "known: acdc, dense, gmp, magnitude, rigl"],
    ),
    "unknown dataset": (
        CONFIG,
        ["data.dataset=fashion_mnst"],
        ["did you mean 'fashion_mnist'?", "known: fashion_mnist, mnist"],
    ),
    "unknown model": (
        CONFIG,
        ["model.name=lenet3000"],
        ["did you mean 'lenet300'?", "torchvision:<name> or hf:<architecture>"],
    ),
    "malformed YAML": ("bad.yaml", [], ["bad.yaml: invalid YAML at line 2, column 1"]),
    "missing file": ("nope.yaml", [], ["config file not found: ", "nope.yaml"]),
    "missing base": ("orphan.yaml", [], ["orphan.yaml: base file not found: ", "gone.yaml"]),
    "base cycle": ("a.yaml", [], ["a.yaml: base chain has a cycle: ", "a.yaml -> ", "b.yaml -> ", "a.yaml"]),
    "STR with global": (
        CONFIG,
        ["sparsity.method=str", "sparsity.distribution=global"],
        ["sparsity.distribution = 'global': method 'str' supports only uniform, er, erk"],
    ),
    "missing target": (
        CONFIG,
        ["sparsity.target=null"],
        ["sparsity.target is required for method 'rigl'", "set it to the final fraction of zeros in [0, 1)"],
    ),
}
YAML_FILES = {
    "typo.yaml": "ham: {alpah: 1}\n",
    "lr.yaml": "optim: {lr: fast}\n",
    "bad.yaml": "ham: {alpha: 1\n",
    "orphan.yaml": "base: gone.yaml\n",
    "a.yaml": "base: b.yaml\n",
    "b.yaml": "base: a.yaml\n",
}


def config_path(tmp_path, name):
    for file, text in YAML_FILES.items():
        (tmp_path / file).write_text(text)
    return name if name == CONFIG else tmp_path / name


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_is_one_line_with_status_2(tmp_path, capsys, case):
    name, sets, fragments = CONFIG_ERRORS[case]
    code, _, err = main(
        capsys, "--config", config_path(tmp_path, name), "--out", tmp_path / "run", *sets_argv(sets)
    )
    message = one_line_error(err)
    assert code == 2
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "run").exists()  # nothing was created for a config that does not load


# -- 2. bad data --------------------------------------------------------------------------------
def test_missing_dataset_is_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    sets = [*FAST, "data.dataset=mnist", f"data.root={tmp_path / 'empty'}"]
    code, _, err = main(capsys, "--config", CONFIG, "--out", tmp_path / "run", *sets_argv(sets))
    assert code == 2
    assert one_line_error(err) == (
        f"MNIST not found at {tmp_path / 'empty' / 'mnist' / 'mnist.npz'}; "
        f"run 'sparseham fetch mnist --root {tmp_path / 'empty'}'"
    )


def write_idx(path, array):
    magic = {3: 0x803, 1: 0x801}[array.ndim]
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes())


def fashion_files(root, damage):
    """Tiny Fashion-MNIST idx files under ``root/fashion_mnist`` with one ``damage`` applied."""
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 32)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "corrupted":
        images.write_bytes(b"\x00\x00\x09\x99" + images.read_bytes()[4:])
    else:
        labels.write_bytes(labels.read_bytes()[:13] + b"\x0c" + labels.read_bytes()[14:])
    return images, labels


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("truncated", "{images}: 75180 bytes, expected 75280 for shape [96, 28, 28] (truncated or padded); "),
        ("corrupted", "{images}: magic number 0x00000999, expected 0x00000803; "),
        (
            "bad label",
            "{labels}: label 12 at index 5 is outside [0, 10); the file is corrupt, fetch it again",
        ),
    ],
    ids=["truncated", "corrupted", "bad label"],
)
def test_damaged_idx_files_are_one_line_with_status_2(tmp_path, capsys, monkeypatch, damage, expected):
    # The Debian package's folder is searched first and is installed here: point it elsewhere.
    monkeypatch.setattr("sparseham.data.files.FASHION_SYSTEM_DIR", tmp_path / "no-debian-package")
    images, labels = fashion_files(tmp_path / "data", damage)
    sets = [*FAST, "data.dataset=fashion_mnist", f"data.root={tmp_path / 'data'}"]
    code, _, err = main(capsys, "--config", CONFIG, "--out", tmp_path / "run", *sets_argv(sets))
    message = one_line_error(err)
    assert code == 2 and message.startswith(expected.format(images=images, labels=labels)), message
    if damage != "bad label":
        assert message.endswith(
            "delete it and fetch again: sparseham fetch fashion_mnist --root ROOT"
        )


# -- 3. numerical faults ------------------------------------------------------------------------
def make_trainer(tmp_path, *sets):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    return Trainer(load_config(CONFIG, [*FAST, *sets]), out)


def snapshot(t):
    """What a rejected step must leave alone: weights, BatchNorm statistics, masks, optimizer state."""
    return {
        "model": {k: v.clone() for k, v in t.model.state_dict().items()},
        "masks": [m.clone() for m in t.mm.masks],
        "optimizer": copy.deepcopy(t.opt.state_dict()["state"]),
        "manager_steps": t.mm.step_count,
    }


def assert_equal_nested(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def record_around(t, k, snaps):
    """Put snapshots of the state just before step ``k`` and just after it in ``snaps``."""
    original = t.after_step

    def after_step():
        original()
        if t.step in (k - 1, k):
            snaps[t.step] = snapshot(t)

    t.after_step = after_step


def nan_output_at(t, k):
    def hook(module, inputs, output):
        if module.training and t.step == k - 1:
            return output * float("nan")

    return hook


def bad_grad_at(t, k, value):
    def hook(grad):
        if t.step == k - 1:
            grad = grad.clone()
            grad.view(-1)[0] = value
            return grad

    return hook


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_skipped_once_cleanly(t, final, snaps, k):
    assert_equal_nested(snaps[k], snaps[k - 1])
    assert final["skipped_steps"] == 1 and final["steps"] == 12
    assert final["sparsity"] == pytest.approx(0.95, abs=1e-4)
    records = jsonl(t.run_dir / "metrics.jsonl")
    assert {"event": "skip", "step": k, "skipped": 1} in records
    assert all(0 < r["loss"] < math.inf for r in records if r["event"] == "train")  # kept out of the log
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.parametrize("model", ["lenet300", "resnet20"])
def test_nan_loss_is_skipped_without_touching_state(tmp_path, model):
    """NaN from the first layer on; resnet20's BatchNorm statistics see it before the loss does."""
    t = make_trainer(tmp_path, f"model.name={model}", "train.on_nonfinite=skip")
    first = next(m for m in t.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.register_forward_hook(nan_output_at(t, 6))
    snaps = {}
    record_around(t, 6, snaps)
    assert_skipped_once_cleanly(t, t.train(), snaps, 6)


@pytest.mark.parametrize(
    "value", [float("inf"), float("-inf"), float("nan"), 1e38], ids=["inf", "-inf", "nan", "1e38"]
)
def test_bad_gradient_is_skipped_without_touching_state(tmp_path, value):
    """One gradient entry goes bad; 1e38 is finite, but the gradient norm overflows: rejected too."""
    t = make_trainer(tmp_path, "train.on_nonfinite=skip")
    t.mm.params[0].register_hook(bad_grad_at(t, 6, value))
    snaps = {}
    record_around(t, 6, snaps)
    assert_skipped_once_cleanly(t, t.train(), snaps, 6)


def test_stop_keeps_the_last_good_state_and_skip_resumes_it(tmp_path, capsys, monkeypatch):
    snaps = {}

    class Faulty(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.mm.params[0].register_hook(bad_grad_at(self, 6, float("inf")))
            record_around(self, 6, snaps)

    monkeypatch.setattr(trainer_module, "Trainer", Faulty)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    out = tmp_path / "run"
    assert trainer_module.run(load_config(CONFIG, FAST), out) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "non-finite loss or gradient at step 6 (epoch 0.31): the last good state is in "
        f"{out / 'checkpoint.pt'}; "
        "re-run with --set train.on_nonfinite=skip to skip such steps, or lower optim.lr in a new run"
    )
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
    state, before = load_checkpoint(out / "checkpoint.pt"), snaps[5]
    assert state["step"] == 5 and 6 not in snaps and not (out / "final.json").exists()
    assert_equal_nested(state["model"], before["model"])
    assert_equal_nested(state["manager"]["masks"], before["masks"])
    assert_equal_nested(state["optimizer"]["state"], before["optimizer"])
    assert torch.isfinite(state["logger"]["loss"])
    # The message's advice works on the same run directory.
    assert trainer_module.run(load_config(CONFIG, [*FAST, "train.on_nonfinite=skip"]), out) == 0
    assert f"resumed from {out / 'checkpoint.pt'} at step 5" in capsys.readouterr().out
    final = json.loads((out / "final.json").read_text())
    assert (final["skipped_steps"], final["steps"]) == (1, 12)


def test_real_divergence_through_train_py_stops_with_status_1(tmp_path, capsys):
    sets = [*FAST, "optim.lr=1e30", "ham.enabled=false"]
    code, _, err = main(capsys, "--config", CONFIG, "--out", tmp_path / "run", *sets_argv(sets))
    assert code == 1
    # Iteration 1 only sets RigL's topology (its reference update), iteration 2 is the first
    # optimizer step at lr 1e30, so iteration 3's loss is the first non-finite one.
    assert one_line_error(err).startswith("non-finite loss or gradient at step 3 (epoch 0.12): the last good")
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("scale", [1e3, 1e12, 1e16, 1e18, 1e36])  # norms past float32 need float64
def test_ham_keeps_weights_finite_and_capped_under_huge_finite_gradients(scale, foreach):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 8))
    opt = HAM(torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=foreach), 200.0, 1e-3, max_norm=1000.0)
    for sign in (1, -1, 1):
        p.grad = sign * scale * torch.randn(8, 8).sign()
        opt.step()
        assert torch.isfinite(p).all()
        assert torch.linalg.vector_norm(p.detach().double()) <= 1000.0 * (1 + 1e-5)


# -- 4. crash safety ----------------------------------------------------------------------------
def numbered(run_dir):
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("checkpoint-*.pt"))


def test_damaged_checkpoints_fall_back_and_say_so(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run")
    assert numbered(out) == [140, 145, 150]  # checkpoint.keep = 3
    (out / "final.json").unlink()  # as if killed between the last checkpoint and final.json
    newest = out / "checkpoint-150.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # checkpoint.pt links it
    flip_payload_byte(out / "checkpoint-145.pt")
    code, stdout, err = main(capsys, "--config", CONFIG, "--out", out, *sets_argv(RUN))
    assert code == 0, err
    warning = "warning: skipped a damaged checkpoint, falling back: "
    assert f"{warning}{out / 'checkpoint.pt'} is truncated or corrupted (RuntimeError)\n" in stdout
    assert f"{warning}{out / 'checkpoint-145.pt'} is corrupted (checksum mismatch)\n" in stdout
    assert f"resumed from {out / 'checkpoint-140.pt'} at step 140\n" in stdout
    assert_same_weights(model_state(out / "checkpoint.pt"), model_state(reference / "checkpoint.pt"))
    assert numbered(out) == [140, 145, 150]


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past ``nbytes`` fail with EFBIG, as on a full disk (root ignores chmod, not this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_at_checkpoint_time_is_one_line_and_loses_nothing(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run")
    for name in ("final.json", "checkpoint.pt", "checkpoint-150.pt"):
        (out / name).unlink()
    os.link(out / "checkpoint-145.pt", out / "checkpoint.pt")
    argv = ["--config", CONFIG, "--out", out, *sets_argv(RUN)]
    with file_size_limit((out / "checkpoint.pt").stat().st_size // 2):
        code, _, err = main(capsys, *argv)
    assert code == 1
    assert one_line_error(err) == (
        f"cannot write checkpoint-150.pt in {out}: File too large; the previous checkpoint is intact; "
        "free disk space or make the directory writable, then re-run the same command"
    )
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 145 and numbered(out) == [140, 145]
    assert not (out / ".checkpoint.tmp").exists() and not (out / "final.json").exists()
    code, stdout, err = main(capsys, *argv)  # space again: the same command finishes the run
    assert code == 0 and f"resumed from {out / 'checkpoint.pt'} at step 145" in stdout, err
    assert_same_weights(model_state(out / "checkpoint.pt"), model_state(reference / "checkpoint.pt"))


RUN_DIR_FIX = (
    "check free disk space and that the run directory is writable, then re-run the same command to resume"
)


def test_disk_full_while_logging_is_one_line_and_the_rerun_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", CONFIG, "--out", out, *sets_argv([*FAST, "logging.log_every=1"])]
    with file_size_limit(2000):  # config.yaml fits, the logs soon do not
        code, _, err = main(capsys, *argv)
    assert code == 1 and one_line_error(err) == f"{out}: File too large; {RUN_DIR_FIX}"
    code, _, err = main(capsys, *argv)
    assert code == 0 and json.loads((out / "final.json").read_text())["steps"] == 12, err


@pytest.mark.slow
def test_disk_full_under_tensorboard_is_one_line_without_a_thread_traceback(tmp_path):
    # TensorBoard writes from its own thread; histograms every step fill the limit quickly.
    sets = [s for s in FAST if not s.startswith("logging.tensorboard")] + ["logging.log_every=1",
                                                                          "logging.histograms_every=1"]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))

    out = tmp_path / "run"
    proc = subprocess.run(command(out, sets), cwd=ROOT, capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1 and one_line_error(proc.stderr).endswith(RUN_DIR_FIX), proc.stderr
    assert "Traceback" not in proc.stdout


def test_unusable_run_directory_is_one_line_with_status_1(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    code, _, err = main(capsys, "--config", CONFIG, "--out", out, *sets_argv(FAST))
    assert code == 1 and one_line_error(err) == f"{out}: Not a directory; {RUN_DIR_FIX}"


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"


def kill_at(proc, out, kind, target):
    """SIGKILL ``proc`` at a moment; returns False when the process ended first.

    ``kind`` "step": once its progress line reaches step ``target``; "write": while it writes the
    first checkpoint at or after step ``target`` (its ``.checkpoint.tmp`` is new); "time":
    ``target`` seconds after the launch.
    """
    progress, start = [0], time.monotonic()

    def watch():  # also drains the pipe, so the child never blocks on it
        for line in proc.stdout:
            if m := re.match(r"step (\d+)/", line):
                progress[0] = int(m.group(1))

    threading.Thread(target=watch, daemon=True).start()
    tmp, seen = out / ".checkpoint.tmp", None
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            stamp = tmp.stat().st_mtime_ns if tmp.exists() else None
        now = {
            "step": progress[0] >= target,
            "write": progress[0] >= target and stamp not in (None, seen),
            "time": time.monotonic() - start >= target,
        }[kind]
        if now:
            proc.kill()
            proc.wait()
            return True
        if progress[0] < target:
            seen = stamp  # a temp file from before the target step does not count
        time.sleep(0.0002)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_the_run(reference_sparse_logs, tmp_path, capsys):
    reference = reference_sparse_logs
    rng = random.Random(7)
    targets = sorted(rng.sample(range(10, TOTAL - 20), 4))
    moments = [("step", s) for s in targets]
    moments[rng.randrange(4)] = ("write", targets[rng.randrange(4)])
    moments = sorted(moments, key=lambda m: m[1])
    moments.insert(rng.randrange(5), ("time", rng.uniform(0.1, 1.0)))  # during start-up
    out, during_write = tmp_path / "run", 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind, target in moments:
        proc = subprocess.Popen(command(out, SPARSE_LOGS), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        assert kill_at(proc, out, kind, target), f"the run ended before the {kind} kill at {target}"
        if kind == "write" and (out / ".checkpoint.tmp").exists():
            during_write += 1
        elif kind == "write" and len(moments) < 8:  # killed just after the rename: try once more
            moments.append((kind, target))
        if (out / "checkpoint.pt").exists():
            load_checkpoint(out / "checkpoint.pt")  # never a torn checkpoint.pt
    assert during_write == 1  # a kill landed between opening the temp file and the rename
    code, stdout, err = main(capsys, "--config", CONFIG, "--out", out, *sets_argv(SPARSE_LOGS))
    assert code == 0, err
    assert_same_weights(model_state(out / "checkpoint.pt"), model_state(reference / "checkpoint.pt"))
    # The logs too, record for record (times aside): final.json, and metrics.jsonl but for the
    # start record each attempt writes where it resumed.
    wall = {"wall_time_s", "time_s", "samples_per_s"}
    mine, theirs = ({k: v for k, v in json.loads((d / "final.json").read_text()).items() if k not in wall}
                    for d in (out, reference))
    assert mine == theirs
    starts = [e for e in _history(out) if e["event"] == "start"]
    assert [e["step"] for e in starts] == sorted(e["step"] for e in starts) and len(starts) >= 2
    assert [e for e in _history(out) if e["event"] != "start"] == \
        [e for e in _history(reference) if e["event"] != "start"]


@pytest.fixture(scope="module")
def interpreter_start_s():
    """Seconds until this interpreter runs its first line (site, .pth files): Python's own, before
    sparseham can handle a Ctrl-C (there it is Python's "Fatal Python error")."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.1, 1.0, 2.2])
def test_ctrl_c_during_start_up_is_one_line_and_the_rerun_finishes(tmp_path, delay, interpreter_start_s):
    # After the interpreter's own start, ~3 s go to importing torch, then the run is set up.
    out, sets = tmp_path / "run", [*FAST, "train.max_steps=300"]  # still running at the last delay
    argv = [sys.executable, "-m", "sparseham", "train", "--config", CONFIG, "--out", str(out),
            *sets_argv(sets)]
    # SIGINT at its default even where this test runs in the background (a shell ignores it there).
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2 * interpreter_start_s + delay)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"the run finished within {delay} s")
    # 130, or ended by the signal itself (Python re-raises SIGINT at exit once a KeyboardInterrupt
    # went through the import machinery); a shell shows both as 130.
    assert proc.returncode in (128 + signal.SIGINT, -signal.SIGINT) and "Traceback" not in err, err
    # Before training: the line "interrupted" on stderr; once the loop runs, its stop line on stdout.
    last = err.strip().splitlines()[-1:]
    assert last == ["interrupted"] or "SIGINT: stopped at step" in stdout, (stdout, err)
    assert train_main(["--config", CONFIG, "--out", str(out), *sets_argv(sets)]) == 0


def _history(run_dir):
    """metrics.jsonl without what differs between equal runs (times, rates, resumption)."""
    volatile = {"time_s", "wall_time_s", "samples_per_s", "resumed", "data_source"}
    return [{k: v for k, v in json.loads(line).items() if k not in volatile}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_kill_during_the_first_checkpoint_leaves_no_duplicate_records(reference, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # until the kill lands inside the first checkpoint's write
        proc = subprocess.Popen(command(out, RUN), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        assert kill_at(proc, out, "write", 5)
        if not (out / "checkpoint.pt").exists():
            break
        shutil.rmtree(out)
    assert not (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").read_text()
    code, _, err = main(capsys, "--config", CONFIG, "--out", out, *sets_argv(RUN))
    assert code == 0, err
    mine = _history(out)
    assert [e["event"] for e in mine].count("start") == 1
    assert mine == _history(reference)  # the first attempt left nothing behind


# -- 5. invariants at run time ------------------------------------------------------------------
def first_pruned(mm):
    return int((~mm.masks[0]).flatten().nonzero()[0])


def flip_pruned_bit(mm):
    mm.masks[0].view(-1)[first_pruned(mm)] = True


def revive_pruned_weight(mm):
    with torch.no_grad():
        mm.params[0].view(-1)[first_pruned(mm)] = 0.5


def corrupt_after(t, at, how):
    original, calls = t.mm.step, [0]

    def step(scaler=None):
        original(scaler)
        calls[0] += 1  # training iterations (RigL's first one only sets up the topology)
        if calls[0] == at:
            how(t.mm)

    t.mm.step = step


@pytest.mark.parametrize(
    "how,at,message",
    [
        (flip_pruned_bit, 5, r"fc1\.weight: mask keeps (\d+) weights, the method asked for (\d+)"),
        (revive_pruned_weight, 8, r"fc1\.weight: 1 pruned weights are non-zero"),
    ],
    ids=["mask bit", "pruned weight"],
)
def test_corrupted_mask_raises_at_the_next_log(tmp_path, how, at, message):
    t = make_trainer(tmp_path)
    corrupt_after(t, at, how)
    with pytest.raises(MaskInvariantError, match=f"^{message}$") as info:
        t.train()
    assert t.step == 8  # the first log interval (every 4 steps) after the corruption
    if how is flip_pruned_bit:
        kept, asked = map(int, re.match(message, str(info.value)).groups())
        assert kept == asked + 1


def test_corrupted_mask_through_train_py_exits_1(tmp_path, capsys, monkeypatch):
    original = MaskManager.step

    def step(self, scaler=None):
        original(self, scaler)
        if self.step_count == 5:
            flip_pruned_bit(self)

    monkeypatch.setattr(MaskManager, "step", step)
    code, _, err = main(capsys, "--config", CONFIG, "--out", tmp_path / "run", *sets_argv(FAST))
    assert code == 1
    assert re.fullmatch(r"fc1\.weight: mask keeps \d+ weights, the method asked for \d+", one_line_error(err))


def keep_everything(mm):
    mm.set_masks(
        [torch.ones_like(p, dtype=torch.bool) for p in mm.params], expected=[p.numel() for p in mm.params]
    )


def zero_half(mm):
    with torch.no_grad():
        for p in mm.params:
            p.view(-1)[: p.numel() // 2] = 0.0


@pytest.mark.parametrize(
    "sets,how,message",
    [
        (
            [],
            keep_everything,
            "training ended at sparsity 0.0000, but method 'rigl' promised 0.9500 (within 0.01)",
        ),
        (
            ["sparsity.method=dense", "sparsity.target=null"],
            zero_half,
            "training ended at sparsity 0.5000, but method 'dense' promised 0.0000 (within 0.01)",
        ),
    ],
    ids=["rigl", "dense"],
)
def test_final_sparsity_is_reconciled_with_the_promise(tmp_path, monkeypatch, sets, how, message):
    t = make_trainer(tmp_path, *sets)
    monkeypatch.setattr(t.mm.method, "finalize", how)
    with pytest.raises(MaskInvariantError, match="^" + re.escape(message) + "; masks or weights drifted"):
        t.train()
    assert not (t.run_dir / "final.json").exists()


def test_str_target_mode_ends_within_tolerance(tmp_path):
    final = make_trainer(tmp_path, "sparsity.method=str").train()
    assert abs(final["sparsity"] - 0.95) <= 0.01


@pytest.mark.parametrize(
    "target,mode,achieved,ok",
    [
        (0.9, "target", 0.905, True),
        (0.9, "target", 0.889, False),
        (0.9, "free", 0.5, True),
        (0.0, None, 0.009, True),
        (0.0, None, 0.011, False),
    ],
)
def test_final_sparsity_tolerance(target, mode, achieved, ok):
    options = SimpleNamespace(mode=mode) if mode else SimpleNamespace()
    method = SimpleNamespace(name="m", target=target, options=options, promised_sparsity=lambda mm: target)
    manager = SimpleNamespace(method=method, verify=lambda: None, sparsity=lambda: achieved)
    if ok:
        assert check_final_sparsity(manager) == achieved
    else:
        with pytest.raises(MaskInvariantError, match=f"training ended at sparsity {achieved:.4f}"):
            check_final_sparsity(manager)


# -- signals and the run directory --------------------------------------------------------------
def test_sigint_checkpoints_stops_and_restores_the_handler(tmp_path):
    t = make_trainer(tmp_path)
    original, handler = t.after_step, signal.getsignal(signal.SIGINT)

    def after_step():
        if t.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        original()

    t.after_step = after_step
    with pytest.raises(TrainingStopped) as info:
        t.train()
    assert info.value.code == 128 + signal.SIGINT
    assert (
        str(info.value) == "SIGINT: stopped at step 5; checkpoint written; re-run the same command to resume"
    )
    assert load_checkpoint(t.run_dir / "checkpoint.pt")["step"] == 5
    assert signal.getsignal(signal.SIGINT) is handler


def test_other_config_in_out_is_refused_in_one_line(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run")
    code, _, err = main(capsys, "--config", CONFIG, "--out", out, *sets_argv([*RUN, "optim.lr=0.1"]))
    assert code == 2
    assert one_line_error(err) == (
        f"{out} holds a run with a different config (optim.lr: 0.05 there, 0.1 now); "
        "choose another --out, or pass --force to move the old run aside"
    )
    # How faults are handled is not a different run: a stopped run resumes with skip.
    assert prepare_run_dir(out, load_config(CONFIG, [*RUN, "train.on_nonfinite=skip"])) is False

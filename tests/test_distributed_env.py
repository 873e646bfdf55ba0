"""torchrun's variables set by hand (issue 33, item 9): each bad combination exits 2 with one line
before the run directory is touched, and a rank whose peers never come stops waiting with one
line instead of hanging. Real processes, as a user would start them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sparseham.cli import train_main

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet300", "train.max_steps=2", "train.device=cpu",
        "logging.tensorboard=false"]
TORCHRUN = ("start the processes with torchrun --nproc_per_node=N (it sets RANK, WORLD_SIZE, MASTER_ADDR "
            "and MASTER_PORT)")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "SPARSEHAM_RENDEZVOUS_TIMEOUT_S")


def _train(tmp_path: Path, env: dict, *sets: str, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC")}
    argv = [sys.executable, "-m", "sparseham", "train", "--config", "default", "--out", str(tmp_path / "run")]
    for s in (*SETS, *sets):
        argv += ["--set", s]
    return subprocess.run(argv, env={**base, "OMP_NUM_THREADS": "1", **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _assert_one_line_exit_2(proc: subprocess.CompletedProcess, tmp_path: Path) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    return proc.stderr.strip().removeprefix("error: ")


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2"}, f"WORLD_SIZE=2 but RANK, MASTER_ADDR and MASTER_PORT are not set: {TORCHRUN}, "
                          "or unset WORLD_SIZE for one process"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"},
     f"WORLD_SIZE=2 but MASTER_PORT is not set: {TORCHRUN}, or unset WORLD_SIZE for one process"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, f"RANK=5 must be below WORLD_SIZE=2 (ranks 0 to 1); {TORCHRUN}"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, f"RANK=1 must be below WORLD_SIZE=1 (rank 0 only); {TORCHRUN}"),
    ({"WORLD_SIZE": "0"}, f"WORLD_SIZE='0' is not a number of processes (at least 1); {TORCHRUN}, or unset "
                          "WORLD_SIZE for one process"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2' is not a number of processes (at least 1)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' is not a process rank (0 or more)"),
    ({"WORLD_SIZE": "1", "RANK": "x"}, "RANK='x' is not a process rank (0 or more)"),
    ({"LOCAL_RANK": "gpu0"}, "LOCAL_RANK='gpu0' is not a local rank (0 or more)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT='70000' is not a TCP port (1 to 65535)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234",
      "SPARSEHAM_RENDEZVOUS_TIMEOUT_S": "soon"}, "SPARSEHAM_RENDEZVOUS_TIMEOUT_S='soon' is not a number of "
                                               "seconds above 0"),
])
def test_bad_torchrun_variables_exit_2_in_one_line(tmp_path, capsys, monkeypatch, env, message):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["--config", "default", "--out", str(tmp_path / "run"), "--set", *SETS]
    code = train_main(argv)
    out, err = capsys.readouterr()
    proc = subprocess.CompletedProcess(argv, code, out, err)
    assert _assert_one_line_exit_2(proc, tmp_path).startswith(message)


def test_a_rank_beyond_the_world_exits_2_instead_of_waiting(tmp_path):
    """The case that hung with no output: a real process, with a rendezvous address it could wait at."""
    env = {"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()}
    message = _assert_one_line_exit_2(_train(tmp_path, env, timeout=40), tmp_path)
    assert message == f"RANK=5 must be below WORLD_SIZE=2 (ranks 0 to 1); {TORCHRUN}"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_stops_waiting_in_one_line(tmp_path, rank):
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "SPARSEHAM_RENDEZVOUS_TIMEOUT_S": "2"}
    message = _assert_one_line_exit_2(_train(tmp_path, env, timeout=40), tmp_path)
    expected = (rf"rank {rank} of 2: the other processes did not join at 127\.0\.0\.1:{port} within "
                rf"2 s \(.+\); {re.escape(TORCHRUN)}, or set SPARSEHAM_RENDEZVOUS_TIMEOUT_S to wait longer")
    assert re.fullmatch(expected, message), message


def test_fsdp_without_torchrun_exits_2_in_one_line(tmp_path):
    message = _assert_one_line_exit_2(_train(tmp_path, {}, "train.distributed=fsdp"), tmp_path)
    assert message == ("train.distributed = 'fsdp' shards the model over several processes, but this is one "
                       "process: start it with torchrun --nproc_per_node=N, or use ddp")


@pytest.mark.slow
def test_two_processes_started_by_hand_train_together(tmp_path):
    """The rendezvous this module bounds still forms a group: rank 1 starts first and waits."""
    port = _free_port()
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    argv = [sys.executable, "-m", "sparseham", "train", "--config", "default", "--out", str(tmp_path / "run")]
    for s in SETS:
        argv += ["--set", s]
    procs = [subprocess.Popen(argv, env={**base, "OMP_NUM_THREADS": "1", **env, "RANK": r, "LOCAL_RANK": r},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in ("1", "0")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert '"world_size": 2' in (tmp_path / "run" / "final.json").read_text()

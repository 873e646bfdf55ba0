"""Smoke tests of the benchmark scripts: each runs with ``--quick`` (tiny sizes, two repeats) and exits 0.

They check what a benchmark reports, never how fast anything is: timings on a shared CI machine
say nothing. The scripts run in this process (as ``python benchmarks/X.py`` would, with
``benchmarks/`` on ``sys.path``), which saves the seconds of importing torch again.
"""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, tmp_path: Path, monkeypatch, *args: str) -> dict:
    """Run ``benchmarks/<name>.py --quick --json ...`` as ``__main__``; returns the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), "--quick", "--json", str(out), *args])
    before = set(sys.modules)
    try:
        runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (None, 0), f"{name}.py exited with status {stop.code}"
    finally:  # the scripts import each other as top-level modules; do not leak them to other tests
        for mod in set(sys.modules) - before:
            if str(BENCH) in str(getattr(sys.modules[mod], "__file__", "")):
                del sys.modules[mod]
    return json.loads(out.read_text())


def test_tracker_quick(tmp_path, monkeypatch):
    report = run_script("tracker", tmp_path, monkeypatch, "--primitives")
    (result,) = report["results"]
    assert result["tensors"] == 4 and result["numel"] == 9408 + 3 * 36864
    assert set(result["ratio_to_sgd"]) == {"tracker", "tracker_per_weight", "tracker_i10", "tracker_i100",
                                           "exp", "gt", "mul_bool", "mul_float"}
    assert all(s["n"] == 2 for s in result["seconds_per_step"].values())


def test_rigl_update_quick(tmp_path, monkeypatch, capsys):
    report = run_script("rigl_update", tmp_path, monkeypatch)
    result = report["result"]
    out = capsys.readouterr().out
    assert "vector ISA" in out and "rigl peak extra memory: " in out and "target <= 1.5 B/weight" in out
    versus = report["rigl_torch"]
    if "skipped" in versus:  # rigl-torch is not installed here: the benchmark says so
        assert "rigl-torch: rigl-torch is not importable" in out
    else:
        assert versus["version"] == "0.5.2" and "rigl-torch / ours" in out
    assert result["identical_masks"] is True
    # The memory method sees exactly one 4 MiB tensor; between pre_step and post_step RigL holds
    # the grown set as one bool mask per layer (topk_mask: ties to the lower flat index, the same
    # on every device and FSDP shard), one byte per managed weight.
    assert result["calibration_4MiB"] == 4 * 2**20
    mem = result["memory_bytes"]
    assert mem["held_across_step"] == result["managed_weights"]
    assert mem["peak"] >= mem["pre_step_peak"] >= mem["held_across_step"]
    assert result["peak_bytes_per_weight"] == pytest.approx(mem["peak"] / result["managed_weights"])


def test_pipeline_quick(tmp_path, monkeypatch):
    (result,) = run_script("pipeline", tmp_path, monkeypatch)["results"]
    variants = {"plain", "ham", "tracker", "masks", "pipeline", "pipeline_staged", "trainer",
                "trainer_staged"}
    assert set(result["seconds_per_step"]) == variants
    assert set(result["ratio_plain_over"]) == variants - {"plain"}
    assert result["skipped_steps"] == 0
    assert result["rigl_update_s"] > 0


def test_gpu_quick(tmp_path, monkeypatch, capsys):
    report = run_script("gpu", tmp_path, monkeypatch)
    assert report["failed"] == []
    assert set(report["results"]) == {"ham_step", "tracker", "rigl_update", "pipeline", "pipeline_step",
                                      "syncs"}
    syncs = report["results"]["syncs"]
    # 20 calls with updates every 5 optimizer steps; RigL's reference updates are iterations of their own.
    assert syncs["steps_checked"] == 20 and syncs["update_steps_checked"] == 3
    assert syncs["mm_step_error"] is None
    # The sections run for real on the CPU too: the numbers are there, and they are consistent.
    results = report["results"]
    assert results["rigl_update"]["identical_masks"] is True
    assert all(v["median"] > 0 for v in results["tracker"]["seconds_per_step"].values())
    assert results["pipeline"]["skipped_steps"] == 0 and results["pipeline"]["rigl_update_s"] > 0
    if not torch.cuda.is_available():
        assert "No CUDA device" in capsys.readouterr().out
        assert report["verdicts"]["mm.step() host syncs"]["met"] is None


def test_inference_quick(tmp_path, monkeypatch):
    report = run_script("inference", tmp_path, monkeypatch)
    rows = report["cpu"]
    assert [r["layer"] for r in rows] == ["lenet300.fc1", "lenet300.fc2"]
    assert all(r["dense_ms"] > 0 and r["csr_ms"] > 0 and r["dense_over_csr"] > 0 for r in rows)
    if not torch.cuda.is_available():
        assert report["cuda"] == {"skipped": "no CUDA device"}


@pytest.mark.compiled
def test_pipeline_step_quick(tmp_path, monkeypatch):
    (result,) = run_script("pipeline_step", tmp_path, monkeypatch)["results"]
    assert result["tensors"] == 2 and result["numel"] == 64 * 16 * 9 + 128 * 64
    variants = ("pipeline_staged", "pipeline_one_pass", "pipeline_one_pass_no_cap",
                "pipeline_one_pass_inductor", "ham_staged", "ham_one_pass", "ham_one_pass_no_cap",
                "ham_one_pass_inductor")
    stages = {f"{code}_{row}" for code in ("kernel", "native")
              for row in ("sgd", "+mirror", "+masks", "+tracker", "calls_only")}
    assert set(result["ratio_over_base"]) == ({f"{o}_{v}" for o in ("sgd", "adamw") for v in variants}
                                              | stages | {"roofline", "grad_reset"})
    assert all(s["n"] == 2 for s in result["seconds"].values())
    # The targets with verdicts, the fastest path per optimizer, and the ISA they were measured on.
    assert result["isa"] == torch.backends.cpu.get_cpu_capability()
    assert result["target"] == (2.0 if result["isa"] == "AVX2" else 1.5)
    verdicts = "\n".join(result["verdicts"])
    for opt in ("sgd", "adamw"):
        assert f"{opt}_pipeline_one_pass / {opt}: " in verdicts and f"fastest {opt} pipeline on " in verdicts
    assert "MET" in verdicts


@pytest.mark.compiled
def test_one_pass_probe_quick(tmp_path, monkeypatch):
    (result,) = run_script("one_pass_probe", tmp_path, monkeypatch)["results"]
    assert result["tensors"] == 2 and result["counts_identical"]  # compiled == eager transcription
    assert result["max_abs_diff_vs_eager"] < 1e-6 and result["ratio"] > 0
    assert all(s["n"] == 2 for s in result["seconds"].values())


def test_sparsegpt_layer_quick(tmp_path, monkeypatch):
    report = run_script("sparsegpt_layer", tmp_path, monkeypatch)
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [r["case"] for r in report["results"]] == ["unstructured 50%", "2:4"]
    for result in report["results"]:  # no --reference: sparseham alone
        assert set(result["seconds"]) == {"sparseham"} and result["seconds"]["sparseham"]["n"] == 2
        assert result["shape"] == [64, 256] and result["peak_extra_bytes"]["sparseham"] > 0

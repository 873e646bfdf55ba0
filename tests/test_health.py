"""HAM's diagnostics through the training app: the one warning line, TensorBoard, final.json and
the report (sparseham.train.health)."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparseham.analysis import report
from sparseham.cli import train_main
from sparseham.train import health

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=32",
        "data.synthetic.train_size=512", "data.synthetic.test_size=128", "train.max_steps=48",
        "sparsity.rigl.update_every=8",
        "logging.log_every=4", "logging.progress=false", "checkpoint.every=0", "train.on_nonfinite=skip"]


def _train(capsys, out: Path, *sets: str) -> tuple[int, str]:
    code = train_main(["--config", str(ROOT / "configs/default.yaml"), "--out", str(out),
                       "--set", *SETS, *sets])
    return code, capsys.readouterr().out


def test_saturating_exponent_warns_once_and_is_logged_everywhere(tmp_path, capsys):
    # alpha * lr = 5000 with the authors' clamp 5: the loss explodes within 8 steps. (With the norm
    # cap on, the cap's firing is diagnosed; here it is off.)
    code, out = _train(capsys, tmp_path / "bad", "ham.alpha=100000", "optim.lr=0.05", "ham.clamp=5",
                       "ham.max_norm=null")
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out
    assert warnings[0].startswith("warning: HAM's exponent saturates on ")
    assert warnings[0].endswith("% of weights (alpha*lr = 5e+03, ham.clamp = 5): lower ham.alpha or optim.lr")

    final = json.loads((tmp_path / "bad" / "final.json").read_text())
    # Only a few percent of the exponents reach the clamp, but each such weight grows by e^5 a step.
    assert final["ham"]["clamp"] == 5.0 and final["ham"]["clamped_fraction"] > health.CLAMPING
    records = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r["event"] == "warning"]
    assert [e["message"] for e in events] == [warnings[0].removeprefix("warning: ")]
    fractions = [r["ham"]["clamped_fraction"] for r in records if r["event"] == "train"]
    # Once the weights are not finite, every step is skipped: those intervals have no fraction.
    taken = [f for f in fractions if f is not None]
    assert len(fractions) == 12 and taken and all(0.0 <= f <= 1.0 for f in taken)
    assert final["skipped_steps"] > 0 and None in fractions
    # The run's fraction is the entry-weighted mean of the intervals'.
    assert min(taken) <= final["ham"]["clamped_fraction"] <= max(taken)

    tags = EventAccumulator(str(tmp_path / "bad"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]
    assert {"ham/clamped_fraction", "ham/capped"} <= set(tags)

    report.write_report([tmp_path / "bad"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    fraction = final["ham"]["clamped_fraction"]
    assert f"| HAM exponent at the clamp (fraction of entries) | {fraction:.4f} |" in md
    assert f"| warning | {events[0]['message']} |" in md


def test_gentle_run_has_no_warning_and_a_small_clamped_fraction(tmp_path, capsys):
    code, out = _train(capsys, tmp_path / "ok", "ham.alpha=20", "ham.clamp=0.05")
    assert code == 0 and "warning:" not in out
    final = json.loads((tmp_path / "ok" / "final.json").read_text())
    assert 0.0 <= final["ham"]["clamped_fraction"] < health.SATURATED and final["ham"]["capped"] == 0


def test_rising_loss_warns(tmp_path, capsys):
    # Without HAM: plain SGD at a learning rate that diverges.
    code, out = _train(capsys, tmp_path / "lr", "ham.enabled=false", "optim.lr=30", "optim.momentum=0.9")
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out
    assert warnings[0].startswith("warning: the training loss rose to ")
    assert warnings[0].endswith(f"over {health.LOSS_RISE:g}x its first logged value "
                                f"{warnings[0].split('value ')[1].split(':')[0]}: lower optim.lr")


def test_health_rules_on_their_own():
    class Fake:
        def __init__(self, seq):
            self.seq = iter(seq)

        def diagnostics(self, names):
            return next(self.seq)

    def diag(fraction, capped=0):
        return {"clamped_fraction": fraction, "clamped": int(fraction * 100), "entries": 100,
                "capped": capped, "steps": 1, "layers": {}}

    seq = [diag(0.6), diag(0.05), *[diag(0.6)] * 5, diag(0.9)]
    h = health.TrainingHealth(Fake(seq), {}, alpha_lr=2.0, clamp=0.05, max_norm=1000.0)
    said = [h.update(2.0)[1] for _ in range(len(seq))]  # the loss never falls: not learning
    assert said[:6] == [None] * 6  # the run of 5 high intervals starts again after the 0.05
    assert said[6] == ("HAM's exponent saturates on 60% of weights (alpha*lr = 2, ham.clamp = 0.05): "
                       "lower ham.alpha or optim.lr")
    assert said[7] is None  # once per run
    assert h.summary() == {"clamped_fraction": (60 + 5 + 5 * 60 + 90) / 800, "capped": 0}
    learning = health.TrainingHealth(Fake([diag(0.6)] * 8), {}, alpha_lr=2.0, clamp=0.02, max_norm=None)
    losses = [2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6]  # saturated but learning (ResNet-20 does this)
    assert [learning.update(loss)[1] for loss in losses] == [None] * 8

    capped = health.TrainingHealth(Fake([diag(0.0, 1), diag(0.0, 0), diag(0.0, 2), diag(0.0, 1)]), {},
                                   alpha_lr=2.0, clamp=5.0, max_norm=1000.0)
    said = [capped.update(2.0)[1] for _ in range(4)]
    assert said[:3] == [None] * 3 and said[3].startswith("HAM's norm cap (ham.max_norm = 1000) rescaled "
                                                         "weights in 3 log intervals")

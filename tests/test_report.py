"""Tests for analysis.report, analysis.runs and analysis.plots on fake run directories."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import _rundirs
import numpy as np
import pytest
from conftest import skip_unless_required
from PIL import Image

from sparseham.analysis import plots, report, runs

__all__: list[str] = []

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table(text: str, ident: str) -> list[list[str]]:
    """The cells of the HTML table ``ident``, header row first."""
    body = re.search(rf'<table id="{ident}">(.*?)</table>', text, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def _md_table(text: str, first_header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _images(text: str) -> list[bytes]:
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    return [base64.b64decode(uri) for uri in uris]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    rigl = _rundirs.write_run(root / "rigl", method="rigl", ham=False, test_acc=0.8712)
    ham = _rundirs.write_run(root / "rigl_ham", method="rigl", ham=True, hist=True, test_acc=0.8834)
    out = root / "report"
    assert report.main([str(rigl), str(ham), "--out", str(out)]) == 0
    return [rigl, ham], out, (out / "report.html").read_text(), (out / "report.md").read_text()


def test_report_has_every_section(two_runs):
    _, out, text, md = two_runs
    for heading in ["How the numbers are computed", "Comparison", "Run 1: rigl", "Run 2: rigl_ham"]:
        assert f">{heading}</h2>" in text
        assert f"## {heading}" in md
    for caption in report._CAPTIONS.values():
        assert html.escape(caption) in text and caption in md
    assert text.count(">Layers</h3>") == 2
    assert "per 1,000 weights per epoch" in text and "N−A" in text
    assert "<script" not in text and "http" not in text


def test_every_plot_is_embedded_png(two_runs):
    _, out, text, md = two_runs
    files = sorted(out.glob("*.png"))
    # Run 1: rate, cumulative, fractions, masks, curves; run 2 adds the histogram; + compare.
    assert len(files) == 12
    images = _images(text)
    assert len(images) == len(files) == len(re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", md))
    for png in images:
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.width > 200 and img.height > 200
    assert sorted(images) == sorted(f.read_bytes() for f in files)
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file()


def test_comparison_table_equals_final_json(two_runs):
    paths, _, text, md = two_runs
    for rows in (_table(text, "comparison"), _md_table(md, "group")):
        head, body = rows[0], rows[1:]
        assert len(body) == 2
        for path, row in zip(paths, body):
            final = json.loads((path / "final.json").read_text())
            numel = sum(layer["numel"] for layer in final["layers"].values())
            flips = final["flips_masked"] + final["flips_unmasked"]
            rate = flips * 1000 / numel / final["epochs"]
            cell = dict(zip(head, row))
            assert cell["runs"] == path.name and cell["n"] == "1" and cell["status"] == "done"
            assert cell["test acc"] == f"{final['test_acc']:.4f}"
            assert cell["sparsity"] == f"{final['sparsity']:.4f}"
            assert cell["masked flips"] == str(final["flips_masked"])
            assert cell["unmasked flips"] == str(final["flips_unmasked"])
            assert cell["flips / 1,000 weights / epoch"] == f"{rate:.2f}"
            assert cell["ever flipped (fraction)"] == f"{final['ever_flipped_frac']:.4f}"
            assert cell["wall time (s)"] == f"{final['wall_time_s']:.1f}"
    assert _table(text, "comparison")[1][0] == "#1 ham.enabled=false"


def test_seed_groups_are_mean_and_std(tmp_path):
    paths = [_rundirs.write_run(tmp_path / f"ham_s{s}", ham=True, seed=s, records=3,
                                test_acc=acc) for s, acc in enumerate([0.90, 0.92, 0.94])]
    paths.append(_rundirs.write_run(tmp_path / "static", method="static", records=3))
    loaded = [runs.load_run(p) for p in paths]
    # The comparison section alone: a full report of four runs would draw 21 figures.
    blocks, groups, names = report._comparison(loaded, [p.name for p in paths])
    tables = {b[1]: b[2:] for b in blocks if b[0] == "table"}
    head, rows = tables["comparison"]
    assert groups == [0, 0, 0, 1] and names == ["ham.enabled=true, method=rigl",
                                                "ham.enabled=false, method=static"]
    cell = dict(zip(head, rows[0]))
    assert cell["n"] == "3" and cell["runs"] == "ham_s0, ham_s1, ham_s2"
    assert cell["test acc"] == "0.9200 ± 0.0200"
    masked = [json.loads((p / "final.json").read_text())["flips_masked"] for p in paths[:3]]
    assert cell["masked flips"] == f"{statistics.mean(masked):.0f} ± {statistics.stdev(masked):.0f}"
    assert dict(zip(head, rows[1]))["n"] == "1"
    head, rows = tables["per-run"]
    assert [r[0] for r in rows] == ["ham_s0", "ham_s1", "ham_s2", "static"]
    assert [dict(zip(head, r))["test acc"] for r in rows[:3]] == ["0.9000", "0.9200", "0.9400"]


def test_flip_rates_are_per_thousand_weights_per_epoch():
    layer = {"numel": 1000, "active": 100, "ever_flipped": 5, "differs_from_init": 2}
    records = [{"step": 50, "epoch": 0.5, "steps": 50, "layers": {"w": {**layer, "masked": 9,
                                                                        "unmasked": 4}}},
               {"step": 150, "epoch": 1.5, "steps": 100, "layers": {"w": {**layer, "masked": 18,
                                                                         "unmasked": 2}}}]
    fs = runs.flip_series(records)
    assert fs.span.tolist() == [0.5, 1.0]
    masked = plots.rate(fs.masked, fs.numel - fs.active, fs.span)[:, 0]
    unmasked = plots.rate(fs.unmasked, fs.active, fs.span)[:, 0]
    # 9 flips among 900 masked weights in half an epoch: 20 per 1,000 per epoch.
    assert masked.tolist() == pytest.approx([20.0, 20.0])
    assert unmasked.tolist() == pytest.approx([80.0, 20.0])
    dense = plots.rate(np.array([3.0]), np.array([0.0]), np.array([1.0]))
    assert np.isnan(dense[0])


def test_many_layers_plot_top_k_plus_aggregate(tmp_path):
    path = _rundirs.write_run(tmp_path / "deep", layers=_rundirs.many_layers(60), records=3,
                              hist=True)
    run = runs.load_run(path)
    fs = runs.flip_series(run.flips)
    top = [fs.layers[j] for j in np.argsort(-(fs.masked + fs.unmasked).sum(0), kind="stable")[:8]]
    figs = plots.run_figures(run, "deep", top_k=8)
    assert set(figs) == {"flip_rate", "cumulative", "fractions", "histogram", "masks", "curves"}
    for name, fig in figs.items():
        for ax in fig.axes:
            assert len(ax.get_lines()) <= 9, name
        assert all(len(leg.get_texts()) <= 9 for leg in fig.legends), name
    labels = [ln.get_label() for ln in figs["flip_rate"].axes[0].get_lines()]
    assert labels == [plots._short(n) for n in top] + ["all layers"]


def test_in_progress_run_with_truncated_lines_and_60_layers(tmp_path):
    path = _rundirs.write_run(tmp_path / "busy", layers=_rundirs.many_layers(60), final=False,
                              truncate=True, records=3)
    records, truncated = runs.read_jsonl(path / "signflips.jsonl")
    assert len(records) == 3 and truncated
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--top-k", "5"]) == 0
    text = (tmp_path / "out" / "report.html").read_text()
    assert "Run 1: busy (in progress)" in text and "final.json is missing" in text
    assert "truncated last line of metrics.jsonl" in text
    row = dict(zip(*_table(text, "comparison")[:2]))
    assert row["status"] == "in progress"
    expected = sum(v["masked"] for r in records for v in r["layers"].values())
    assert row["masked flips"] == str(expected)
    metrics, _ = runs.read_jsonl(path / "metrics.jsonl")
    last_test = [m for m in metrics if m.get("split") == "test"][-1]
    assert row["test acc"] == f"{last_test['acc']:.4f}"
    assert len(_table(text, "run1-layers")) == 61
    assert "(in progress)" in (tmp_path / "out" / "report.md").read_text()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_not_a_run_dir_exits_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"nope: not a run directory \(no config\.yaml\)", _one_line_error(capsys))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("experiment: {seed: 0}\n")
    assert report.main([str(tmp_path / "half"), "--out", str(tmp_path / "o")]) == 2
    assert "half: not a run directory (no metrics.jsonl)" in _one_line_error(capsys)


def test_missing_or_empty_signflips_exits_2(tmp_path, capsys):
    path = _rundirs.write_run(tmp_path / "noflips", signflips=False, records=2)
    assert report.main([str(path), "--out", str(tmp_path / "o")]) == 2
    assert "noflips: no sign-flip data" in _one_line_error(capsys)
    (path / "signflips.jsonl").write_text("")
    assert report.main([str(path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys)
    proc = subprocess.run([sys.executable, "-m", "sparseham", "report", str(path), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"{path}: no sign-flip data" in proc.stderr


def test_bad_top_k_exits_2(tmp_path, capsys):
    path = _rundirs.write_run(tmp_path / "r", records=2)
    assert report.main([str(path), "--out", str(tmp_path / "o"), "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="top_k=0"):
        report.write_report([path], tmp_path / "o", top_k=0)


def test_corrupt_middle_line_exits_2(tmp_path, capsys):
    path = _rundirs.write_run(tmp_path / "bad", records=2)
    lines = (path / "metrics.jsonl").read_text().splitlines()
    (path / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    assert report.main([str(path), "--out", str(tmp_path / "o")]) == 2
    assert "metrics.jsonl:3: not valid JSON" in _one_line_error(capsys)


@pytest.fixture(scope="module")
def chromedriver() -> str:
    """The chromedriver path; module-scoped so that a skip comes before building the report."""
    driver = shutil.which("chromedriver")
    if driver is None:
        skip_unless_required("chromedriver not found (run `make browser`)", "SPARSEHAM_REQUIRE_BROWSER")
    return driver


def _chrome(driver: str, tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'ud'}"):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_renders_in_headless_chromium(chromedriver, two_runs, tmp_path):
    _, out, text, _ = two_runs
    browser = _chrome(chromedriver, tmp_path)
    try:
        browser.get((out / "report.html").as_uri())
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert len(sizes) == len(_images(text)) == 12
        assert all(done and width > 0 for done, width in sizes)
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert shot.read_bytes().startswith(PNG_SIGNATURE) and shot.stat().st_size > 10_000

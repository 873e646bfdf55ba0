"""The docs site (docs/, ``make docs``): it builds strictly; every public name, registered method and
config key has its page or entry; every example runs; the evidence tables on its pages are the
committed CSVs; and the built site renders in headless Chromium."""

from __future__ import annotations

import csv
import fcntl
import html as html_lib
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_unless_required

pytest.importorskip("sphinx")
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import sparseham_docs  # noqa: E402  (docs/_ext: the build's own generator)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Each example and a line its last output must hold.
EXAMPLES = {
    "own_loop.py": "resumed: same step count and masks",
    "hf_trainer.py": "managed 14 projections",
    "lightning_callback.py": "sparsity 0.900",
    "export_and_reload.py": "reloaded model: test accuracy",
    "prune_pretrained.py": "reloaded: the same mask",
}
NEEDS_DATA = {"own_loop.py", "export_and_reload.py"}


def _strict_build(out: Path) -> subprocess.CompletedProcess:
    strict = ["-E", "-W", "--keep-going", "-n", "-q"]
    command = [sys.executable, "-m", "sphinx", *strict, "-b", "html", DOCS, out]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The strictly built site: ``make docs``'s, when its stamp says it was built from these very
    sources; else a fresh strict build here."""
    made = DOCS / "_build" / "html"
    stamp = made / ".strict-build"
    if stamp.is_file() and stamp.read_text().strip() == sparseham_docs.sources_digest():
        return made
    out = tmp_path_factory.mktemp("site")
    lock = DOCS / "_build" / ".test-lock"  # xdist workers: one build of docs/_generated at a time
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        proc = _strict_build(out)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-6000:]
    return out


def _inventory(site: Path) -> dict[str, set[str]]:
    from sphinx.util.inventory import InventoryFile

    with (site / "objects.inv").open("rb") as f:
        inventory = InventoryFile.load(f, "", os.path.join)
    return {kind: set(entries) for kind, entries in inventory.items()}


# -- Coverage: a new name, method or key without documentation fails here ----------------------------
def test_every_public_name_has_an_api_entry(site):
    import sparseham

    inventory = _inventory(site)
    documented = set().union(*(v for k, v in inventory.items() if k.startswith("py:")))
    missing = [n for n in sparseham.__all__ if f"sparseham.{n}" not in documented]
    assert missing == [], f"add these to a page under docs/api/: {missing}"
    for name in sparseham.__all__:
        obj = getattr(sparseham, name)
        assert (obj.__doc__ or "").strip(), f"sparseham.{name} has no docstring for its API entry"


def test_every_registered_method_has_a_page_with_its_docstring_and_options(site):
    import inspect

    from sparseham import methods

    pages = {p.stem for p in (DOCS / "methods").glob("*.rst")}
    assert pages == set(methods.available()), "one docs/methods/NAME.rst per registered method, and no other"
    keys = {e["key"] for e in sparseham_docs.config_keys()}
    for name in methods.available():
        html = (site / "methods" / f"{name}.html").read_text()
        text = " ".join(re.sub(r"\W+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", html))).split())
        cls = methods.get(name)
        docs = [inspect.getdoc(cls)]
        if f".. automodule:: {cls.__module__}" in (DOCS / "methods" / f"{name}.rst").read_text():
            docs.append(inspect.getdoc(inspect.getmodule(cls)))  # the equations, reference, deviations
        for doc in docs:
            words = " ".join(re.sub(r"\W+", " ", doc or "").split()[:6])
            assert words and words in text, (name, words)
        for key in (k for k in keys if k.startswith(f"sparsity.{name}.")):
            assert f'href="../reference/config.html#confval-{key}"' in html, (name, key)


def test_every_config_key_has_an_entry_with_its_help(site):
    entries = sparseham_docs.config_keys()
    assert len(entries) > 100
    assert [e["key"] for e in entries if not e["help"]] == []
    confvals = _inventory(site)["std:confval"]
    missing = [e["key"] for e in entries if e["key"] not in confvals]
    assert missing == []
    page = (site / "reference" / "config.html").read_text()
    assert page.count('class="sig sig-object std"') == len(entries)
    assert 'id="confval-ham.alpha"' in page and 'id="confval-sparsity.rigl.update_every"' in page


def test_config_keys_reads_help_text_exactly():
    from sparseham.config import help_text

    entries = sparseham_docs.config_keys()
    keys = [line.split(":", 1)[0] for line in help_text().splitlines()
            if line and not line.startswith(("    ", "# "))]
    assert [e["key"] for e in entries] == keys
    by_key = {e["key"]: e for e in entries}
    assert by_key["ham.clamp"]["limits"] == "> 0" and by_key["ham.clamp"]["default"] == "0.02"
    assert by_key["optim.name"]["type"] == "sgd|adam|adamw"
    assert by_key["experiment.seed"]["limits"].startswith("in [0,")
    assert by_key["sparsity.rigl.update_every"]["section"] == "sparsity.rigl"


# -- Examples ---------------------------------------------------------------------------------------
def test_every_example_is_run_here_and_shown_on_the_examples_page():
    found = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert found == sorted(EXAMPLES)
    page = (DOCS / "examples.md").read_text()
    for name in found:
        assert f"```{{literalinclude}} ../examples/{name}" in page, name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_at_its_small_size(name, tmp_path):
    if name in NEEDS_DATA:
        from sparseham.data.files import find_fashion_mnist

        if find_fashion_mnist(ROOT / "data") is None:
            skip_unless_required("Fashion-MNIST absent: run 'make data'", "SPARSEHAM_REQUIRE_DATA")
    env = {**os.environ, "SPARSEHAM_EXAMPLE_SMALL": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert EXAMPLES[name] in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr


# -- Evidence: the tables on the pages are the committed CSVs ---------------------------------------
def _page(name: str) -> str:
    return (DOCS / "evidence" / f"{name}.md").read_text()


def _cells(path: str) -> list[dict]:
    with (ROOT / path).open() as f:
        return list(csv.DictReader(f))


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def test_the_clamp_study_tables_are_the_csv():
    import collections

    from sparseham.analysis.clamp_study import _gains, against, load

    page = _page("clamp")
    base, grid = load(ROOT / "docs/study/ham_clamp/cells.csv")
    names = {"lenet300": "LeNet-300", "lenet5": "LeNet-5"}
    for pair in ((200.0, 0.02), (50.0, 5.0)):
        by = collections.defaultdict(list)
        for cell, seed, gain in _gains(base, grid, pair):
            by[(cell[0], seed)].append(100 * gain)
        for (model, seed), gains in by.items():
            row = re.search(rf"^ *\| {names[model]}, seed {seed} \|(.*)\|$", page, flags=re.M)
            cols = [c.strip() for c in row.group(1).split("|")]
            collapses, mean = str(sum(g < -5 for g in gains)), _signed(statistics.mean(gains))
            if pair == (200.0, 0.02):
                assert cols[0] == str(len(gains)) and [cols[1], cols[2], cols[3]] == [
                    collapses, mean, _signed(min(gains))], (model, seed)
            else:
                assert [cols[5], cols[4]] == [collapses, mean], (model, seed)
    names = {"dense": "dense", "static": "random PaI", "rigl": "RigL", "acdc": "AC/DC", "str": "STR"}
    prose = " ".join(page.split())  # the sentence wraps across lines
    for r in against(base, grid):
        assert f"{names[r['method']]} {_signed(r['new_gain'])} against {_signed(r['old_gain'])}" in prose


def test_the_resnet20_table_is_the_csv():
    page = _page("resnet20")
    rows = {(r["method"], r["ham"], r["clamp"], r["seed"]): 100 * float(r["test_acc"])
            for r in _cells("docs/study/ham_resnet20/cells.csv")}
    for method, name in (("dense", "dense"), ("static", "random PaI 90%"), ("rigl", "RigL 90%")):
        plain = " / ".join(f"{rows[(method, 'False', '0.02', s)]:.2f}" for s in "01")
        ham = " / ".join(f"{rows[(method, 'True', '0.02', s)]:.2f}" for s in "01")
        assert re.search(rf"^\| {name} \| {plain} \| {ham} \|", page, flags=re.M), name
    assert " / ".join(f"{rows[('rigl', 'True', '5.0', s)]:.2f}" for s in "01") in page


def test_the_str_projection_table_is_the_csv():
    page = _page("str-projection")
    rows = _cells("docs/study/str_projection/cells.csv")
    assert len(rows) == 6
    for r in rows:
        assert float(r["sparsity"]) == pytest.approx(float(r["target"]), abs=1e-4)  # exact targets
        model = {"lenet300": "LeNet-300", "lenet5": "LeNet-5"}[r["model"]]
        line = re.search(rf"^\| {model}: .*$", page, flags=re.M).group(0)
        column = ["0.9", "0.95", "0.98"].index(r["target"]) + 1
        assert line.split("|")[column + 1].strip().endswith(f"/ {100 * float(r['test_acc']):.2f}%"), r["cell"]


def test_the_sam_table_is_the_csv():
    page = _page("sam")
    runs: dict[tuple, list[float]] = {}
    for r in _cells("docs/study/ham_sam/cells.csv"):
        sam = "rho=null" not in r["cell"]
        runs.setdefault((r["method"], sam, r["ham"] == "True"), []).append(100 * float(r["test_acc"]))
    for method, name in (("dense", "dense"), ("rigl", "RigL 90%")):
        cols = [c.strip() for c in re.search(rf"^\| {name} \|(.*)\|$", page, flags=re.M).group(1).split("|")]
        for i, key in enumerate(((False, False), (False, True), (True, False), (True, True))):
            accs = runs[(method, *key)]
            assert cols[i] == f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}", (name, key)


def test_the_study_page_includes_the_tables_generated_from_the_csv(tmp_path):
    """The study page includes docs/study/results.md after its source line; that part is exactly what
    `sparseham study table docs/study/cells.csv` generates from the committed rows."""
    from sparseham.analysis.study_report import readme_block, write

    generated = readme_block(write(ROOT / "docs/study/cells.csv", tmp_path).read_text())
    committed = readme_block((ROOT / "docs/study/results.md").read_text())
    assert committed == generated, "regenerate: sparseham study table docs/study/cells.csv --out docs/study"
    assert "```{include} ../study/results.md\n:start-line: 3\n```" in _page("study")


def test_the_adding_a_method_snippet_registers_a_working_method():
    import torch

    from sparseham import MaskManager
    from sparseham import method as registry

    page = (DOCS / "guides/adding-a-method.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "@register(" in s]
    saved = dict(registry._REGISTRY)
    try:
        exec(snippet, {})
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mm = MaskManager(model, opt, registry.get("gmp_fixed")(target=0.75, every=2))
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            mm.step()
            opt.zero_grad()
        mm.verify()
        assert abs(mm.sparsity() - 0.75) < 0.01
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def test_the_own_loop_guide_shows_the_snippet_the_readme_test_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]  # run by tests/test_readme.py
    assert f"```python\n{snippet}```" in (DOCS / "guides/own-loop.md").read_text()


# -- The built site in a browser --------------------------------------------------------------------
def test_every_page_is_built_without_an_error_marker(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 40
    for page in pages:
        text = page.read_text()
        assert 'class="problematic"' not in text and 'class="system-message"' not in text, page


@pytest.fixture(scope="module")
def chromedriver() -> str:
    driver = shutil.which("chromedriver")
    if driver is None:
        skip_unless_required("chromedriver not found (run `make browser`)", "SPARSEHAM_REQUIRE_BROWSER")
    return driver


def _chrome(driver: str, tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'ud'}"):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_site_renders_in_headless_chromium(site, chromedriver, tmp_path):
    """The landing page and the HAM API page: title, content, sidebar, no error marker, no failed
    local resource. Screenshots go to $SPARSEHAM_SCREENSHOTS when it is set (to look at them)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("SPARSEHAM_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    browser = _chrome(chromedriver, tmp_path)
    try:
        browser.get((site / "index.html").as_uri())
        assert browser.title.startswith("sparseham")
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("sparseham")
        nav = [a.text for a in browser.find_elements(By.CSS_SELECTOR, ".sidebar-tree a")]
        assert {"Get started", "Your own training loop", "Methods", "API reference", "Evidence"} <= set(nav)
        assert browser.save_screenshot(str(shots / "landing.png"))

        browser.get((site / "api" / "core.html").as_uri())
        assert "HAM" in browser.title
        ham = browser.find_element(By.ID, "sparseham.HAM")
        assert ham.is_displayed() and "HAM" in ham.text
        assert "alpha" in browser.find_element(By.TAG_NAME, "article").text
        assert browser.find_elements(By.CSS_SELECTOR, ".problematic, .system-message") == []
        # The equations are typeset by the MathJax the site ships (no network needed).
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.TAG_NAME, "mjx-container"))
        assert browser.save_screenshot(str(shots / "api_ham.png"))
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []  # the site loads nothing from the network
    finally:
        browser.quit()
    for name in ("landing.png", "api_ham.png"):
        shot = shots / name
        assert shot.read_bytes().startswith(PNG_SIGNATURE) and shot.stat().st_size > 10_000

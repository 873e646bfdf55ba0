"""Packaging: one import name, the ``sparseham`` command, shipped configs, and a wheel that ships every
module of the tree (the architecture's import rules: tests/test_architecture.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import sysconfig
import venv
import warnings
from pathlib import Path

import pytest

import sparseham.methods  # noqa: F401  (registers the built-in methods)
from sparseham import method as registry

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, relative ones resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "sparseham." * bool(node.level) + (node.module or "")
            names.add(base.rstrip("."))
            names |= {f"{base.rstrip('.')}.{alias.name}" for alias in node.names}
    return names


def test_no_module_imports_top_level_methods_or_analysis():
    paths = [*ROOT.glob("*.py")]
    for folder in ("sparseham", "methods", "analysis", "benchmarks", "tests"):
        paths += (ROOT / folder).rglob("*.py")
    offenders = [str(p.relative_to(ROOT)) for p in paths
                 if {n.split(".")[0] for n in imported_modules(p)} & {"methods", "analysis"}]
    assert len(paths) > 50 and not offenders


def test_public_snippet_imports_and_methods_is_lazy():
    code = ("import sys; import sparseham; lazy = 'sparseham.methods' not in sys.modules; "
            "from sparseham import HAM, MaskManager, SignFlipTracker, methods; "
            "print(lazy, methods.__name__, 'rigl' in methods.available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "sparseham.methods", "True"]


def test_registering_the_same_class_twice_keeps_one(monkeypatch):
    rigl = registry.get("rigl")
    # The same file imported a second time under another name, as a top-level ``methods`` on
    # sys.path would have been: its class statements run again.
    spec = importlib.util.spec_from_file_location("sparseham.methods.rigl_again",
                                                  sys.modules[rigl.__module__].__file__)
    again = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.loader.exec_module(again)
    # One registration, and the second module's name is bound to the registered class.
    assert again.RigL is rigl and registry.get("rigl") is rigl
    assert registry.get("set") is again.SET and registry.available().count("rigl") == 1


def test_help_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "sparseham", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("train", "prune", "report", "sweep", "study", "fetch", "export", "eval", "configs"):
        assert f"\n  {command} " in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "sparseham", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("sparseham: unknown command 'trian'; did you mean 'train'?; choose one "
                                  "of train, prune, report, sweep, study, fetch, export, eval, configs")


def test_configs_lists_shipped_configs_and_train_finds_them_by_name(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "sparseham", "configs"], capture_output=True,
                            text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert {"default", "rigl_ham", "paper/imagenet_rigl_ham", "studies/tune"} <= set(listed)
    assert not any(name.startswith("_") or "/_" in name for name in listed)
    proc = subprocess.run([sys.executable, "-m", "sparseham", "train", "--config", "rigl_ham",
                           "--set", "ham.alpha=7", "optim.lr=0.01", "--set", "train.epochs=2",
                           "--print-config"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alpha: 7.0" in proc.stdout and "lr: 0.01" in proc.stdout and "epochs: 2" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "sparseham", "train", "--config", "nope"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error: config file not found: nope (nor a shipped config of "
                                      "that name; `sparseham configs` lists them)")


def _fresh_venv(tmp_path: Path) -> Path:
    """A new venv that reuses this interpreter's third-party packages (torch) through a .pth
    file, but not its editable sparseham: a .pth-added folder's own .pth files are not run."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    purelib.mkdir(parents=True, exist_ok=True)
    (purelib / "reuse.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


@pytest.mark.slow
def test_wheel_installs_one_package_and_trains_from_an_empty_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("sparseham-*.whl")
    env = _fresh_venv(tmp_path)
    python = env / "bin" / "python"
    target = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    tops = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".pth"))}
    assert tops == {"sparseham", "bin"}, tops
    assert (target / "sparseham" / "configs" / "default.yaml").is_file()

    work = tmp_path / "empty"
    work.mkdir()
    (work / "methods.py").write_text("raise ImportError('a user module that must not shadow ours')\n")
    (work / "analysis.py").write_text("raise ImportError('a user module that must not shadow ours')\n")
    script = target / "bin" / "sparseham"
    cli = [str(python), str(script)]
    train = subprocess.run([*cli, "train", "--config", "default", "--set", "train.max_steps=20",
                            "logging.log_every=10", "--out", "X"], cwd=work, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    run = work / "X"
    for name in ("config.yaml", "metrics.jsonl", "signflips.jsonl", "final.json", "checkpoint.pt"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*"))
    final = json.loads((run / "final.json").read_text())
    assert final["steps"] == 20 and 0.0 <= final["test_acc"] <= 1.0
    report = subprocess.run([*cli, "report", "X", "--out", "X/report"], cwd=work, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (run / "report" / "report.html").is_file() and (run / "report" / "report.md").is_file()
    where = subprocess.run([str(python), "-c", "import sparseham; print(sparseham.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    (work / "use_wheel.py").write_text(USE_WHEEL)
    used = subprocess.run([str(python), "use_wheel.py", str(target)], cwd=work, capture_output=True,
                          text=True, timeout=600)
    assert used.returncode == 0, used.stdout + used.stderr
    lines = used.stdout.splitlines()
    imported, shipped = lines[0].split()
    assert int(imported) == int(shipped) == len(tree_modules()), (imported, shipped)
    assert [line for line in lines if line.endswith("-ok")] == ["hf-ok", "lightning-ok"]


def tree_modules() -> set[str]:
    """The import names of every module in the repository's package folders."""
    roots = {"sparseham": ROOT / "sparseham", "sparseham.methods": ROOT / "methods",
             "sparseham.analysis": ROOT / "analysis", "sparseham.configs": ROOT / "configs"}
    names = set()
    for name, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            names.add(".".join((name, *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


# Run with the fresh venv's python in an empty folder: import every module the wheel ships (from
# the wheel, not the repository), then train a few steps with SparseTrainer and SparseCallback.
USE_WHEEL = """
import importlib, pkgutil, sys, warnings
from pathlib import Path
import torch
from torch import nn
import sparseham
target = Path(sys.argv[1])
names = ["sparseham"] + [m.name for m in pkgutil.walk_packages(sparseham.__path__, "sparseham.")]
shipped = [p for p in (target / "sparseham").rglob("*.py")]
for name in names:
    if name == "sparseham.__main__":
        continue  # runs the command line
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(target), (name, module.__file__)
print(len(names), len(shipped))
import transformers
from sparseham import SignFlipTracker, methods
from sparseham.integrations.hf import SparseTrainer
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
ids = torch.randint(0, 64, (16, 16))
data = [{"input_ids": i, "labels": i} for i in ids]
args = transformers.TrainingArguments(output_dir="hf", max_steps=3, per_device_train_batch_size=8,
                                      report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
trainer = SparseTrainer(model=transformers.LlamaForCausalLM(config), args=args, train_dataset=data,
                        method=methods.get("static")(0.5), tracker=SignFlipTracker())
trainer.train()
trainer.mask_manager.verify()
print("hf-ok")
import lightning
from sparseham.integrations.lightning import SparseCallback
class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
        return torch.utils.data.DataLoader(data, batch_size=8)
callback = SparseCallback(methods.get("static")(0.5))
lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, callbacks=[callback]).fit(Module())
callback.mask_manager.verify()
print("lightning-ok")
"""

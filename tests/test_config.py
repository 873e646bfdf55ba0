"""Tests for sparseham.config: schema defaults, every error message, overrides, base chains,
round trips, help metadata, and fuzzing that only ever yields a Config or a ConfigError."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseham.method as method_registry
import sparseham.methods  # noqa: F401  (registers the built-in methods)
from sparseham.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    help_text,
    load_config,
    method_options,
    parse_override,
)
from sparseham.config.schema import HamConfig, OptimConfig, SparsityConfig
from sparseham.method import Method, register


@dataclasses.dataclass
class ToyOptions:
    update_every: int = field(default=100, metadata={"help": "steps between topology updates"})
    drop_fraction: float = field(default=0.3, metadata={"help": "fraction dropped per update"})
    decay: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "drop decay"})
    layers: list[str] = field(default_factory=list, metadata={"help": "globs of updated layers"})

    def __post_init__(self) -> None:
        if self.update_every <= 0:
            raise ValueError(f"update_every must be > 0, got {self.update_every}")


class Toy(Method):
    Options = ToyOptions
    distributions = ("uniform", "er", "erk")


@dataclasses.dataclass
class PaiOptions:
    iterations: int = field(default=1, metadata={"help": "pruning rounds at initialization"})


class Pai(Method):
    Options = PaiOptions
    inits = ("random", "snip")


class StubDense(Method):
    masking = False


@pytest.fixture(autouse=True, scope="module")
def toy_methods():
    """Register the test methods (and a stub 'dense' if no built-in one exists), then restore."""
    saved = dict(method_registry._REGISTRY)
    if "dense" not in saved:
        register("dense")(StubDense)
    register("cfgtoy")(Toy)
    register("cfgpai")(Pai)
    yield
    method_registry._REGISTRY.clear()
    method_registry._REGISTRY.update(saved)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TOY = {"method": "cfgtoy", "target": 0.9}


# -- defaults, types and successful loads ----------------------------------------------------


def test_defaults():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.experiment.name == "run" and cfg.experiment.seed == 0
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.synthetic.size == 16
    assert cfg.model.name == "lenet5"
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.schedule.milestones == [0.5, 0.75]
    assert cfg.ham.alpha == 200.0 and cfg.ham.beta == 1e-3 and cfg.ham.max_norm == 1000.0
    assert cfg.sparsity.method == "dense" and cfg.sparsity.target is None
    assert set(cfg.sparsity.options) == {"dense"}
    assert type(cfg.train.epochs) is float and cfg.train.epochs == 1.0
    assert cfg.checkpoint.resume == "auto"


def test_load_file_and_empty_sections(tmp_path):
    path = write(tmp_path, "x.yaml", "ham:\nexperiment: {name: abc}\n")
    cfg = load_config(path)
    assert cfg.ham == HamConfig() and cfg.experiment.name == "abc"
    assert load_config(write(tmp_path, "empty.yaml", "")) == Config()


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # why the coercion exists
    path = write(tmp_path, "x.yaml", "ham: {beta: 1e-3, alpha: 2e2}\noptim: {lr: 5E-2}\n")
    cfg = load_config(path)
    assert cfg.ham.beta == 0.001 and cfg.ham.alpha == 200.0 and cfg.optim.lr == 0.05


def test_numeric_conversions():
    cfg = config_from_dict({"data": {"batch_size": 64.0, "num_workers": "2"}, "optim": {"lr": 1}})
    assert cfg.data.batch_size == 64 and type(cfg.data.batch_size) is int
    assert cfg.data.num_workers == 2
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert config_from_dict({"train": {"max_steps": "1e3"}}).train.max_steps == 1000


def test_method_sections():
    cfg = config_from_dict({"sparsity": {**TOY, "cfgpai": {"iterations": 3}}})
    assert cfg.sparsity.options["cfgtoy"] == ToyOptions()
    assert cfg.sparsity.options["cfgpai"] == PaiOptions(iterations=3)
    assert method_options(cfg) == {"update_every": 100, "drop_fraction": 0.3, "decay": "cosine",
                                   "layers": []}
    method = method_registry.get("cfgtoy")(cfg.sparsity.target, **method_options(cfg))
    assert method.options == ToyOptions()
    cfg = config_from_dict({"sparsity": {**TOY, "cfgtoy": {"update_every": "50", "layers": ["a"]}}})
    assert method_options(cfg)["update_every"] == 50 and method_options(cfg)["layers"] == ["a"]


def test_supported_distribution_and_init():
    config_from_dict({"sparsity": {"method": "cfgpai", "target": 0.5, "init": "snip"}})
    config_from_dict({"sparsity": {"method": "cfgpai", "target": 0.5, "distribution": "global"}})
    config_from_dict({"sparsity": {"method": "dense", "target": 0}})
    config_from_dict({"model": {"name": "torchvision:resnet18"}, "train": {"device": "cuda:1"}})
    config_from_dict({"train": {"amp": "fp16"}, "optim": {"nesterov": True}})


def test_sections_validate_on_construction():
    with pytest.raises(ConfigError, match=re.escape("clamp = -1.0: must be > 0")):
        HamConfig(clamp=-1)
    assert OptimConfig(lr="0.1", betas=[0.5, 0.6]).betas == (0.5, 0.6)
    with pytest.raises(ConfigError, match="target is required for method 'cfgtoy'"):
        SparsityConfig(method="cfgtoy")
    with pytest.raises(ConfigError, match=r"cfgpai = \{\}: expected the Options of a registered"):
        SparsityConfig(options={"cfgpai": {}})
    assert isinstance(ConfigError("x"), ValueError)
    assert str(ConfigError("a\nb\r\nc")) == "a b c"


# -- error messages: one per kind ---------------------------------------------------------------

ERRORS = [
    ({"ham": {"alpah": 1}},
     re.escape("x.yaml: unknown key 'ham.alpah'; did you mean 'ham.alpha'?")),
    ({"hma": {}}, re.escape("x.yaml: unknown key 'hma'; did you mean 'ham'?")),
    ({"zzzzzz": 1}, re.escape("x.yaml: unknown key 'zzzzzz' (known here: experiment, data,")),
    ({1: 2}, re.escape("x.yaml: unknown key '1' (known here:")),
    ({"data": {"synthetic": {"sise": 3}}},
     re.escape("unknown key 'data.synthetic.sise'; did you mean 'data.synthetic.size'?")),
    ({"ham": {"clamp": -1}}, re.escape("x.yaml: ham.clamp = -1.0: must be > 0")),
    ({"optim": {"momentum": 1}}, re.escape("x.yaml: optim.momentum = 1.0: must be in [0, 1)")),
    ({"checkpoint": {"keep": 0}}, re.escape("checkpoint.keep = 0: must be >= 1")),
    ({"optim": {"lr": "fast"}}, re.escape("x.yaml: optim.lr = 'fast': expected a float")),
    ({"optim": {"lr": True}}, re.escape("optim.lr = true: expected a float")),
    ({"optim": {"lr": float("nan")}}, re.escape("optim.lr = nan: expected a float")),
    ({"data": {"batch_size": True}}, re.escape("data.batch_size = true: expected an integer")),
    ({"data": {"batch_size": 2.5}}, re.escape("data.batch_size = 2.5: expected an integer")),
    ({"ham": {"enabled": "yes"}}, re.escape("ham.enabled = 'yes': expected true or false")),
    ({"experiment": {"name": 3}}, re.escape("experiment.name = 3: expected a string")),
    ({"optim": {"grad_clip": "x"}}, re.escape("optim.grad_clip = 'x': expected a float or null")),
    ({"optim": {"grad_clip": 0}}, re.escape("optim.grad_clip = 0.0: must be > 0")),
    ({"optim": {"name": "sdg"}},
     re.escape("optim.name = 'sdg': expected one of sgd, adam, adamw; did you mean 'sgd'?")),
    ({"ham": {"sign": "half"}},
     re.escape("ham.sign = 'half': expected one of half_step, pre_step")),
    ({"sparsity": {"dense_layers": ["a", 1]}},
     re.escape("sparsity.dense_layers = ['a', 1]: expected a list of strings")),
    ({"sparsity": {"exclude": "fc*"}}, re.escape("sparsity.exclude = 'fc*': expected a list")),
    ({"sparsity": {"include": [None]}}, re.escape("expected a list of strings or null")),
    ({"optim": {"betas": [0.9]}}, re.escape("optim.betas = [0.9]: expected a list of 2 floats")),
    ({"optim": {"betas": [0.9, 1]}}, re.escape("optim.betas = [0.9, 1.0]: each must be in [0, 1)")),
    ({"optim": {"schedule": {"milestones": [0.75, 0.5]}}},
     re.escape("optim.schedule.milestones = [0.75, 0.5]: must be increasing fractions in (0, 1)")),
    ({"optim": {"schedule": {"milestones": [0, 0.5]}}}, "must be increasing fractions"),
    ({"optim": {"nesterov": True, "momentum": 0}},
     re.escape("optim.nesterov = true: Nesterov momentum requires optim.momentum > 0")),
    ({"optim": {"nesterov": True, "name": "adam"}},
     re.escape("optim.nesterov = true: only sgd uses it; set it false for adam")),
    ({"sparsity": {"method": "cfgtoi"}},
     re.escape("x.yaml: sparsity.method = 'cfgtoi': unknown method; did you mean 'cfgtoy'? "
               "(known: ") + ".*cfgtoy"),
    ({"sparsity": {"method": "zzzzzz"}}, r"sparsity.method = 'zzzzzz': unknown method \(known: "),
    ({"sparsity": {"method": "cfgtoy"}},
     re.escape("x.yaml: sparsity.target is required for method 'cfgtoy'")),
    ({"sparsity": {"method": "dense", "target": 0.5}},
     re.escape("sparsity.target = 0.5: method 'dense' cannot reach a target")),
    ({"sparsity": {**TOY, "target": 1}}, re.escape("sparsity.target = 1.0: must be in [0, 1)")),
    ({"sparsity": {**TOY, "distribution": "global"}},
     re.escape("sparsity.distribution = 'global': method 'cfgtoy' supports only uniform, er, erk")),
    ({"sparsity": {**TOY, "init": "snip"}},
     re.escape("sparsity.init = 'snip': method 'cfgtoy' supports only random")),
    ({"sparsity": {**TOY, "init": "snipp"}}, re.escape("expected one of random, magnitude, snip")
     + ".*did you mean 'snip'"),
    ({"sparsity": {**TOY, "cfgtoy": {"update_evry": 1}}},
     re.escape("unknown key 'sparsity.cfgtoy.update_evry'; "
               "did you mean 'sparsity.cfgtoy.update_every'?")),
    ({"sparsity": {**TOY, "cfgtoy": {"update_every": 1.5}}},
     re.escape("x.yaml: sparsity.cfgtoy.update_every = 1.5: expected an integer")),
    ({"sparsity": {**TOY, "cfgtoy": {"decay": "cosin"}}},
     re.escape("sparsity.cfgtoy.decay = 'cosin': expected one of cosine, constant; did you mean")),
    ({"sparsity": {**TOY, "cfgtoy": {"update_every": 0}}},
     re.escape("x.yaml: sparsity.cfgtoy: update_every must be > 0, got 0")),
    ({"sparsity": {**TOY, "cfgtoy": [1]}},
     re.escape("x.yaml: section 'sparsity.cfgtoy' must be a mapping, got [1]")),
    ({"sparsity": {**TOY, "cfgtyo": {}}},
     re.escape("unknown key 'sparsity.cfgtyo'; did you mean 'sparsity.cfgtoy'?")),
    ({"sparsity": {**TOY, "options": {}}}, re.escape("unknown key 'sparsity.options'")),
    ({"data": {"dataset": "cifar"}},
     re.escape("data.dataset = 'cifar': unknown dataset; did you mean 'cifar10'? (known: ")),
    ({"model": {"name": "resnet2"}},
     re.escape("model.name = 'resnet2': unknown model; did you mean") + ".*torchvision:<name>"),
    ({"model": {"name": "torchvision:"}}, re.escape("model.name = 'torchvision:': unknown model")),
    ({"train": {"device": "gpu"}},
     re.escape("train.device = 'gpu': expected auto, cpu, cuda or cuda:N")),
    ({"checkpoint": {"resume": " "}}, re.escape("checkpoint.resume = ' ': expected auto, never")),
    ({"ham": 3}, re.escape("x.yaml: section 'ham' must be a mapping, got 3")),
    ({"data": {"synthetic": "big"}}, re.escape("section 'data.synthetic' must be a mapping")),
    ({"base": "other.yaml"}, re.escape("x.yaml: 'base' works only in a config file")),
]


@pytest.mark.parametrize(("data", "pattern"), ERRORS)
def test_error_messages(data, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        config_from_dict(data, source="x.yaml")
    assert len(str(info.value).splitlines()) == 1


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"^x\.yaml: the top level must be a mapping of sections"):
        config_from_dict([1, 2], source="x.yaml")
    path = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: the top level must be a")):
        load_config(path)


def test_missing_file(tmp_path):
    msg = f"config file not found: {tmp_path / 'no.yaml'}"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(tmp_path / "no.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "ham:\n  alpha: 1\n  beta: [1,\noptim: {}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid YAML at line ")) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    path = write(tmp_path, "tab.yaml", "ham:\n\talpha: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid YAML at line 2, column 1")):
        load_config(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"ham: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not UTF-8 text")):
        load_config(path)


# -- base chains ------------------------------------------------------------------------------


def test_base_chain_deep_merge(tmp_path):
    write(tmp_path, "sub/root.yaml", "ham: {alpha: 1, beta: 2, enabled: true}\n"
                                     "sparsity: {dense_layers: [a, b], method: cfgtoy, target: 0.5,"
                                     " cfgtoy: {update_every: 7, drop_fraction: 0.1}}\n")
    write(tmp_path, "sub/mid.yaml", "base: root.yaml\nham: {alpha: 3}\n"
                                    "sparsity: {dense_layers: [c], cfgtoy: {update_every: 9}}\n")
    top = write(tmp_path, "top.yaml", "base: sub/mid.yaml\nexperiment: {name: top}\n")
    cfg = load_config(top)
    assert (cfg.ham.alpha, cfg.ham.beta, cfg.ham.enabled) == (3.0, 2.0, True)
    assert cfg.sparsity.dense_layers == ["c"]
    assert cfg.sparsity.options["cfgtoy"] == ToyOptions(update_every=9, drop_fraction=0.1)
    assert cfg.experiment.name == "top"
    assert "base" not in config_to_dict(cfg)


def test_errors_name_the_file_that_wrote_the_key(tmp_path):
    base = write(tmp_path, "base.yaml", "ham: {clamp: -2}\n")
    top = write(tmp_path, "top.yaml", "base: base.yaml\nham: {alpha: 1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{base}: ham.clamp = -2.0: must be > 0")):
        load_config(top)
    cfg = load_config(top, ["ham.clamp=1"])
    assert cfg.ham.clamp == 1.0


def test_base_missing_names_the_chain(tmp_path):
    write(tmp_path, "mid.yaml", "base: gone.yaml\n")
    top = write(tmp_path, "top.yaml", "base: mid.yaml\n")
    msg = (f"{tmp_path / 'mid.yaml'}: base file not found: {tmp_path / 'gone.yaml'} "
           f"(chain: {top} -> {tmp_path / 'mid.yaml'} -> {tmp_path / 'gone.yaml'})")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(top)


def test_base_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    msg = f"{a}: base chain has a cycle: {a} -> {b} -> {a}"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(a)
    me = write(tmp_path, "me.yaml", "base: ./me.yaml\n")
    with pytest.raises(ConfigError, match="base chain has a cycle"):
        load_config(me)


def test_base_must_be_a_path(tmp_path):
    path = write(tmp_path, "a.yaml", "base: [x]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: base = ['x']: expected the path")):
        load_config(path)


# -- overrides --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("ham.alpha=100", ("ham.alpha", 100)),
    ("ham.beta=1e-3", ("ham.beta", "1e-3")),
    ("ham.enabled=true", ("ham.enabled", True)),
    ("optim.grad_clip=null", ("optim.grad_clip", None)),
    ("optim.grad_clip=", ("optim.grad_clip", None)),
    ("sparsity.exclude=[a, b]", ("sparsity.exclude", ["a", "b"])),
    (" ham . alpha = 2 ", ("ham.alpha", 2)),
    ("experiment.name=a=b", ("experiment.name", "a=b")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_overrides_of_every_type(tmp_path):
    path = write(tmp_path, "x.yaml", "sparsity: {method: cfgtoy}\noptim: {grad_clip: 1.0}\n")
    cfg = load_config(path, [
        "sparsity.target=0.8", "data.batch_size=64", "optim.lr=0.1", "ham.alpha=-50",
        "ham.beta=1e-3", "ham.enabled=true", "experiment.name=abc", "optim.name=adam",
        "optim.betas=[0.8, 0.99]", "optim.schedule.milestones=[0.3, 0.6, 0.9]",
        "sparsity.dense_layers=[conv1*, fc*]", "optim.grad_clip=null", "sparsity.include=[l*]",
        "train.max_steps=null", "sparsity.cfgtoy.update_every=50", "ham={sign: pre_step}",
        "data.batch_size=32",
    ])
    assert cfg.sparsity.target == 0.8 and cfg.data.batch_size == 32 and cfg.optim.lr == 0.1
    assert cfg.ham.alpha == -50.0 and cfg.ham.beta == 0.001 and cfg.ham.enabled is True
    assert cfg.ham.sign == "pre_step" and cfg.experiment.name == "abc"
    assert cfg.optim.name == "adam" and cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.schedule.milestones == [0.3, 0.6, 0.9]
    assert cfg.sparsity.dense_layers == ["conv1*", "fc*"] and cfg.sparsity.include == ["l*"]
    assert cfg.optim.grad_clip is None and cfg.train.max_steps is None
    assert method_options(cfg)["update_every"] == 50
    assert config_from_dict({}, overrides=["sparsity.include=null"]).sparsity.include is None


OVERRIDE_ERRORS = [
    ("ham.alpha", re.escape("--set: 'ham.alpha': expected key=value")),
    ("=3", re.escape("--set: '=3': expected key=value")),
    ("ham..alpha=1", re.escape("--set: 'ham..alpha=1': the key must be dotted names")),
    ("ham.alpha=[1,", re.escape("--set: 'ham.alpha=[1,': the value is not valid YAML (invalid")),
    ("ham.alpha=2020-13-01", re.escape("--set: 'ham.alpha=2020-13-01': the value is not valid")),
    ("ham.alpah=1", re.escape("--set: unknown key 'ham.alpah'; did you mean 'ham.alpha'?")),
    ("ham.clamp=-1", re.escape("--set: ham.clamp = -1.0: must be > 0")),
    ("optim.lr=fast", re.escape("--set: optim.lr = 'fast': expected a float")),
    ("ham.alpha.x=1", re.escape("--set: 'ham.alpha.x=1': 'ham.alpha' = 1 is a value, not a")),
    ("sparsity.nosuch.x=1", re.escape("--set: unknown key 'sparsity.nosuch'")),
    ("sparsity.method=cfgtoy", re.escape("--set: sparsity.target is required for method")),
]


@pytest.mark.parametrize(("text", "pattern"), OVERRIDE_ERRORS)
def test_override_errors(text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({"ham": {"alpha": 1}}, source="x.yaml", overrides=[text])


def test_overrides_must_be_a_sequence():
    with pytest.raises(TypeError, match="wrap the string in a list"):
        config_from_dict({}, overrides="ham.alpha=1")


# -- round trip and help ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    [],
    ["sparsity.method=cfgtoy", "sparsity.target=0.9", "sparsity.cfgpai.iterations=4",
     "sparsity.cfgtoy.layers=[a]", "optim.betas=[0.5, 0.6]", "optim.grad_clip=2",
     "sparsity.include=[x*]", "experiment.name='123'", "ham.max_norm=null", "ham.beta=1e-10"],
])
def test_round_trip(overrides):
    cfg = config_from_dict({}, overrides=overrides)
    plain = config_to_dict(cfg)
    assert list(plain) == [f.name for f in dataclasses.fields(Config)]
    assert "options" not in plain["sparsity"] and cfg.sparsity.method in plain["sparsity"]
    assert config_from_dict(plain) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def _all_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from _all_fields(f.default_factory, f"{prefix}{f.name}.")


def test_every_field_has_help():
    names = list(_all_fields(Config))
    for name in method_registry.available():
        names += _all_fields(method_registry.get(name).Options, f"sparsity.{name}.")
    assert len(names) > 60
    missing = [name for name, f in names if not str(f.metadata.get("help", "")).strip()]
    assert missing == []


def test_help_text():
    text = help_text()
    for line in ("ham.alpha: float = 200.0", "ham.clamp: float = 0.02 (> 0)",
                 "optim.grad_clip: float | null = null (> 0)", "optim.name: sgd|adam|adamw = sgd",
                 "optim.betas: [float, float] = [0.9, 0.999]", "data.synthetic.noise: float = 1.0",
                 "sparsity.cfgtoy.update_every: int = 100", "    steps between topology updates"):
        assert line in text


# -- fuzzing: a Config or a ConfigError, never anything else ----------------------------------


PATHS = [name for name, f in _all_fields(Config) if not f.metadata.get("sections")]
PATHS += [f"sparsity.{m}.{f.name}" for m, opts in (("cfgtoy", ToyOptions), ("cfgpai", PaiOptions))
          for f in dataclasses.fields(opts)]
KEYS = sorted({"base", "cfgtoy", "cfgpai", "dense"} | {p for path in PATHS for p in path.split(".")})
WORDS = ["sgd", "adam", "cosine", "cfgtoy", "cfgpai", "dense", "erk", "global", "snip", "1e-3",
         "null", "auto", "cuda:0", "synthetic", "mnist", "lenet5", "torchvision:x", "half_step"]
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                   st.sampled_from(WORDS), st.floats(0, 1), st.integers(1, 100))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers(-2, 2))
trees = st.recursive(
    leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(keys, kids, max_size=4),
    max_leaves=20)


def _nest(items):
    """A config mapping from (dotted key, value) pairs; a later pair loses where paths clash."""
    out = {}
    for path, value in items:
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(last, value)
    return out


# Mostly real keys with plausible values, so that fuzzing also reaches the relation checks.
real_trees = st.lists(st.tuples(st.sampled_from(PATHS), leaves | trees), max_size=8).map(_nest)


def _accepts_or_config_error(data, overrides=()):
    try:
        cfg = config_from_dict(data, source="fuzz.yaml", overrides=overrides)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1 and str(e)
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees | real_trees)
def test_fuzz_yaml_trees(data):
    _accepts_or_config_error(data)


dotted = st.sampled_from(PATHS) | st.lists(
    st.sampled_from(KEYS) | st.text(max_size=4), min_size=1, max_size=4).map(".".join)
values = st.text(max_size=12) | st.sampled_from(WORDS + ["[a, b]", "[0.2, 0.4]", "{}", "0.5"])
override_text = st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", dotted, values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(override_text)
def test_fuzz_overrides(text):
    try:
        parse_override(text)
    except ConfigError:
        pass
    _accepts_or_config_error({"sparsity": {"method": "cfgtoy", "target": 0.5}}, [text])


def test_config_defaults_are_the_constructors_defaults():
    """One home for a default: every config key that feeds a constructor argument of the same name
    has that argument's default (HAM, its functional, the tracker, SAM)."""
    import dataclasses
    import inspect

    from sparseham import HAM, SAM, SignFlipTracker
    from sparseham.config.schema import HamConfig, SamConfig, TrackingConfig
    from sparseham.ham import ham

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    pairs = [(HamConfig, HAM), (TrackingConfig, SignFlipTracker), (SamConfig, SAM)]
    checked = 0
    for section, target in pairs:
        wanted = defaults(target)
        for key in dataclasses.fields(section):
            if key.name in wanted and (section, key.name) != (SamConfig, "rho"):  # null: SAM is off
                value = None if key.default == "auto" else key.default  # YAML's spelling of None
                assert value == wanted[key.name], (section.__name__, key.name)
                checked += 1
    assert checked >= 10
    # The functional mirror step has no norm cap by default (max_norm=None); the rest agree.
    assert all(defaults(ham)[k] == defaults(HAM)[k] for k in ("clamp", "foreach", "fused"))

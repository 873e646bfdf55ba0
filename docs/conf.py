"""Sphinx configuration of the sparseham docs site (``make docs``; the site lands in docs/_build/html).

Why these tools:

- **Sphinx + autodoc**: the docstrings are already reStructuredText (``.. math::``, ``:class:``,
  ``:mod:``), with each method's equations, the reference file it follows and its deviations;
  autodoc renders them as they are, so the API and method pages come from the code, not from copies.
  PyTorch, torchvision and Lightning use Sphinx too, so its look and its cross-references are
  what our users know.
- **furo**: a clean, readable theme with a light and a dark mode and a good sidebar.
- **myst-parser**: the guides are Markdown, like the README they came from, and they can include
  the study's generated Markdown tables (docs/study/) verbatim.
- **sphinx-mathjax-offline**: MathJax 3 ships inside the site, so the methods' equations render
  without a network (and in the headless-browser test).
- **No sphinx-gallery**: the examples in ``examples/`` are plain scripts that a user copies; the
  pages include them with ``literalinclude`` and ``tests/test_docs.py`` runs each one (at a small
  size, ``SPARSEHAM_EXAMPLE_SMALL=1``) in its own process. Executing them inside the build would
  make every ``make docs`` train five models and take minutes; the test runs them once, in
  parallel with the rest of the suite.

The build is strict (``-W --keep-going -n``, the Makefile's ``docs`` target): every warning and
every unresolved internal reference fails it. References into other projects (torch,
transformers, the standard library, ...) cannot resolve offline (no intersphinx inventories can
be downloaded here), so they are ignored by name below; references to ``sparseham`` never are.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "sparseham"
author = "the sparseham authors"
copyright = "the sparseham authors"  # noqa: A001 (Sphinx's name)


def _version() -> str:
    import sparseham

    return sparseham.__version__


release = version = _version()

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into the site: the equations render offline too
    "sphinx.ext.viewcode",
    "myst_parser",
    "sparseham_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# The study's generated files are included by the evidence pages, not pages of their own.
exclude_patterns = ["_build", "_generated", "README.md", "study/**", "linreg/**", "report/**"]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"sparseham {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}
# A subclass method without a docstring of its own gets none (not torch's, whose references cannot resolve).
autodoc_inherit_docstrings = False
autodoc_preserve_defaults = True
# Importing the integrations needs their extras; the docs extra is installed with dev, which has them.
autodoc_mock_imports: list[str] = []

nitpicky = True
# Targets outside sparseham: without their inventories (offline) they cannot resolve.
_EXTERNAL = (r"(torch|nn|Tensor|Optimizer|np|numpy|transformers|lightning|pl|typing|collections|abc|"
             r"dataclasses|os|pathlib|Path|argparse|contextlib|enum|io|builtins|types|Callable|Iterable|"
             r"Iterator|Sequence|Mapping|MutableMapping|Any|ClassVar|Literal|TypeVar|Generator|Sized|"
             r"Module|Parameter|LRScheduler|GradScaler|Trainer|TrainingArguments|Callback|"
             r"LightningModule|PretrainedConfig|PreTrainedModel|DataLoader|Dataset|"
             r"int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|NoneType|"
             r"Exception|ValueError|TypeError|KeyError|RuntimeError|OSError|UserWarning|Warning|"
             r"ellipsis|EllipsisType|functools|itertools|threading|signal|re|math)")
nitpick_ignore_regex = [
    (r"py:.*", r".*\._.*"),  # private modules and names are not documented
    (r"py:.*", rf"{_EXTERNAL}(\..*)?"),
    (r"py:.*", r"(torch|transformers|lightning)\..*"),
]


def _benchmarks_current(app) -> None:
    """docs/_generated/benchmarks_current.md: benchmarks/CURRENT.md (one current row per target)
    where it exists, else a pointer to the lab log."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    current = ROOT / "benchmarks" / "CURRENT.md"
    if current.is_file():
        text = current.read_text()
    else:
        text = ("The table of current figures (`benchmarks/CURRENT.md`) has not been written yet; until it "
                "is, every measurement, with its command, machine and spread, is in the lab log below.\n")
    target = out / "benchmarks_current.md"
    if not target.is_file() or target.read_text() != text:  # unchanged: keep Sphinx's cache valid
        target.write_text(text)


def setup(app):
    app.connect("builder-inited", _benchmarks_current)

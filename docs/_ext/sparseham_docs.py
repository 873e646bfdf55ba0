"""Pages generated from the code at build time, so that they cannot go stale.

Directives:

- ``sparseham-config-keys``: every config key, from :func:`sparseham.config.help_text` (the
  schema's dataclasses and each method's ``Options``, with their ``metadata`` help), one
  ``confval`` entry per key under a heading per section; ``:confval:`ham.alpha``` links to one.
- ``sparseham-method-options:: NAME``: the options of a registered method, linked to those entries.
- ``sparseham-methods-table``: every registered method with a link to its page and the first line
  of its docstring; a method without a page is a broken link, so the strict build fails.
- ``sparseham-runs:: CSV``: the rows of a committed study CSV, the columns given in ``:columns:``.
"""

from __future__ import annotations

import csv
import inspect
import re
from collections import OrderedDict
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["config_keys", "setup", "sources_digest"]

ROOT = Path(__file__).resolve().parents[2]
_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.]*): (?P<type>.+?) = (?P<rest>.*)$")
_LIMITS = re.compile(r"^(?P<default>.*) \((?P<limits>(?:in [\[(]|[<>]=? ).*)\)$")
SECTIONS = OrderedDict([
    ("experiment", "The run's name, seed and where it is written."),
    ("data", "The data set and its loaders."),
    ("model", "The network."),
    ("optim", "The base optimizer (HAM, when enabled, wraps it) and its schedule."),
    ("ham", "HAM's mirror step; see :doc:`/guides/alpha-and-clamp`."),
    ("sparsity", "The sparsification method, its target and distribution; each method's own options "
                 "follow in ``sparsity.<method>`` below."),
    ("tracking", "The sign-flip tracker."),
    ("train", "The loop: length, evaluation, device, precision, distribution, failure handling."),
    ("logging", "TensorBoard, metrics and progress."),
    ("checkpoint", "Checkpoints and resume."),
])


def config_keys() -> list[dict[str, str]]:
    """Every config key as ``{key, type, default, limits, help, section}``, in the schema's order."""
    from sparseham.config import help_text

    entries: list[dict[str, str]] = []
    section = ""
    lines = help_text().splitlines()
    for line in lines:
        if line.startswith("# "):
            section = line[2:].split(":", 1)[0]  # "# sparsity.rigl: options of method 'rigl'"
            continue
        if line.startswith("    "):
            entries[-1]["help"] = line.strip()
            continue
        match = _KEY.match(line)
        if not match:
            raise ValueError(f"help_text(): cannot read the line {line!r}")
        rest = match["rest"]
        limits = _LIMITS.match(rest)
        default, bound = (limits["default"], limits["limits"]) if limits else (rest, "")
        top = match["key"].split(".", 1)[0]
        entries.append({"key": match["key"], "type": match["type"], "default": default, "limits": bound,
                        "help": "", "section": section if section else top})
    return entries


def sources_digest() -> str:
    """A digest of everything the site is built from (the docs' sources, the package, the
    plug-ins, the examples, the study files): equal digests, equal sites. ``make docs`` writes it
    beside a strict build, and ``tests/test_docs.py`` reuses that build only when it still holds."""
    import hashlib

    skip = {"_build", "_generated", "__pycache__"}
    files = [p for top in ("docs", "sparseham", "methods", "analysis", "configs", "examples")
             for p in (ROOT / top).rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    files += [p for p in (ROOT / "benchmarks").glob("*.md")]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _literal(text: str) -> str:
    return f"``{text}``" if text.strip() else "(empty)"


def _help(text: str) -> str:
    # Help texts are plain text: escape what reStructuredText would read as markup.
    return re.sub(r"([*`|_\\])", r"\\\1", text)


class ConfigKeys(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for entry in config_keys():
            groups.setdefault(entry["section"], []).append(entry)
        lines: list[str] = []
        for section, entries in groups.items():
            title = f"``{section}``"
            lines += [title, "-" * len(title), ""]
            if section in SECTIONS:
                lines += [SECTIONS[section], ""]
            elif section.startswith("sparsity."):
                method = section.split(".", 1)[1]
                lines += [f"Options of the method ``{method}`` (:doc:`/methods/{method}`); set them "
                          f"under ``sparsity.{method}`` with ``sparsity.method: {method}``.", ""]
            for e in entries:
                lines += [f".. confval:: {e['key']}", f"   :type: {_literal(e['type'])}",
                          f"   :default: {_literal(e['default'])}", ""]
                text = _help(e["help"]) or "(no help text)"
                if e["limits"]:
                    text += f" Allowed: ``{e['limits']}``."
                lines += [f"   {text}", ""]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="sparseham.config.help_text()"), node)
        return node.children


def _method_class(name: str):
    from sparseham import methods

    if name not in methods.available():
        raise ValueError(f"no registered method {name!r}; registered: {', '.join(methods.available())}")
    return methods.get(name)


class MethodOptions(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        _method_class(name)
        entries = [e for e in config_keys() if e["section"] == f"sparsity.{name}"]
        if not entries:
            lines = [f"``{name}`` has no options of its own; the shared keys (:confval:`sparsity.target`, "
                     ":confval:`sparsity.distribution`, ...) apply."]
        else:
            lines = [f"Set under ``sparsity.{name}`` in YAML, or as keyword arguments of "
                     f"``methods.get({name!r})(target, ...)``.", "",
                     ".. list-table::", "   :header-rows: 1", "   :widths: 25 15 15 45", "",
                     "   * - key", "     - type", "     - default", "     - meaning"]
            for e in entries:
                lines += [f"   * - :confval:`{e['key']}`", f"     - {_literal(e['type'])}",
                          f"     - {_literal(e['default'])}", f"     - {_help(e['help'])}"]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"methods.get({name!r}).Options"), 0, node)
        return node.children


class MethodsTable(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        from sparseham import methods

        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 15 25 60", "",
                 "   * - name", "     - class", "     - what it does"]
        modules = [methods.get(n).__module__ for n in methods.available()]
        for name in methods.available():
            cls = methods.get(name)
            # The module's first paragraph (already reStructuredText), or the class's where a module
            # holds several methods (rigl.py: RigL and SET).
            shared = modules.count(cls.__module__) > 1
            doc = inspect.getdoc(cls if shared else inspect.getmodule(cls)) or ""
            first = doc.split("\n\n", 1)[0].replace("\n", " ")
            lines += [f"   * - :doc:`{name} </methods/{name}>`",
                      f"     - :class:`~{cls.__module__}.{cls.__qualname__}`", f"     - {first}"]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="sparseham.methods.available()"), 0, node)
        return node.children


class Runs(SphinxDirective):
    required_arguments = 1
    option_spec = {"columns": directives.unchanged_required, "where": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        path = ROOT / self.arguments[0]
        self.env.note_dependency(str(path))
        columns = [c.strip() for c in self.options["columns"].split(",")]
        where = dict(kv.split("=", 1) for kv in self.options.get("where", "").split() if kv)
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if all(r[k] == v for k, v in where.items())]
        missing = [c for c in columns if rows and c not in rows[0]]
        if missing:
            raise self.error(f"{path}: no column {', '.join(missing)}")
        lines = [".. list-table::", "   :header-rows: 1", ""]
        for row in [dict(zip(columns, columns)), *rows]:
            lines += [f"   * - {_literal(row[columns[0]])}"]
            lines += [f"     - {_literal(row[c])}" for c in columns[1:]]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=str(path)), 0, node)
        return node.children


def _plain_attribute_docstring(self) -> list[str]:
    """napoleon reads an attribute's or property's first line as ``type: text``; this project's
    never carry an inline type (annotations do), and their text has colons ("N:M", "... beta: x")."""
    return self._format_field("", "", self._dedent(self._consume_to_end()))


def _resolve_by_suffix(app, env, node, contnode):
    """A docstring's short reference (``:class:`Method``` in :mod:`sparseham.method`) resolves to
    the one documented object with that name, as ``:class:`.Method``` would."""
    if node.get("refdomain") != "py" or node.get("refspecific"):
        return None
    domain = env.get_domain("py")
    target = node["reftarget"]
    matches = domain.find_obj(env, node.get("py:module"), node.get("py:class"), target,
                              node["reftype"], searchmode=1)
    matches = [(n, o) for n, o in matches if not o.aliased]  # autodoc's canonical names repeat them
    if len(matches) != 1:
        return None
    name, obj = matches[0]
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


def setup(app):
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    GoogleDocstring._parse_attribute_docstring = _plain_attribute_docstring
    app.connect("missing-reference", _resolve_by_suffix)
    app.add_directive("sparseham-config-keys", ConfigKeys)
    app.add_directive("sparseham-method-options", MethodOptions)
    app.add_directive("sparseham-methods-table", MethodsTable)
    app.add_directive("sparseham-runs", Runs)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--digest"]:
        sys.exit("usage: python docs/_ext/sparseham_docs.py --digest")
    print(sources_digest())

"""The import graph of fszjax: layers with one direction (see ARCHITECTURE.md).

Parses every module under fszjax/ with `ast` (nothing is imported) and fails, listing every
violation, on:
  - a cycle among fszjax modules (imports inside functions count too);
  - an import from a lower layer to a higher one (`LAYERS` below);
  - an fszjax-internal import inside a function or class (they sit at the module top);
  - a lazy (function-local) third-party import without a comment naming why it is lazy;
  - a `user_error` attribute (user-facing errors subclass `fszjax.errors.UserError`).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fszjax")

# Layer of each module, lowest first; the first matching pattern wins. A module may import
# from its own layer and the layers below. `fszjax` is the package's own __init__.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("fszjax.errors", "fszjax.tree", "fszjax.config", "fszjax.config_defaults",
             "fszjax.interrupt")),
    ("core", ("fszjax.models.*", "fszjax.losses", "fszjax.sharding",
              "fszjax.checkpoint", "fszjax.workdir", "fszjax.flops", "fszjax.multihost",
              "fszjax.metrics")),
    # Commands are on top even inside data/ and fewshot/.
    ("top", ("fszjax", "fszjax.cli", "fszjax.*.cli", "fszjax.train_cli", "fszjax.report",
             "fszjax.convert", "fszjax.convert.*", "fszjax.bench", "fszjax.fewshot.bench",
             "fszjax.aot", "fszjax.aot_report")),
    ("data_text", ("fszjax.text", "fszjax.text.*", "fszjax.data", "fszjax.data.*")),
    ("train_eval", ("fszjax.pretrain", "fszjax.train_state", "fszjax.train_step", "fszjax.loop",
                    "fszjax.evaluate", "fszjax.fewshot", "fszjax.fewshot.*", "fszjax.inference")),
)
RANK = {"base": 0, "core": 1, "data_text": 2, "train_eval": 3, "top": 4}

# The only function-local fszjax import allowed: the package's own `fszjax.load`, loaded on
# first use so that `import fszjax.<module>` (which runs fszjax/__init__.py first) does not
# load JAX and TensorFlow before the CLI has configured them.
ALLOWED_LOCAL = {("fszjax", "fszjax.inference")}


def layer_of(module: str) -> str | None:
  for name, patterns in LAYERS:
    if any(fnmatch.fnmatchcase(module, p) for p in patterns):
      return name
  return None


def _modules() -> dict[str, str]:
  mods = {}
  for d, _, files in os.walk(PKG):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  return mods


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
  """fszjax modules an import statement loads (`from fszjax import x` -> `fszjax.x`)."""
  out = []
  if isinstance(node, ast.Import):
    out = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:
      parts = module.split(".")
      if not MODULES[module].endswith("__init__.py"):
        parts = parts[:-1]
      parts = parts[:len(parts) - (node.level - 1)]
      base = ".".join(parts + ([base] if base else []))
    for a in node.names:
      out.append(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
  found = []
  for t in out:
    while t and t not in MODULES:  # `import fszjax.a.b.c`: the longest existing module
      t = t.rpartition(".")[0]
    if t.startswith("fszjax") and t != module:
      found.append(t)
  return found


def _says_why(line: str) -> bool:
  """A comment on the import line beyond linter directives (``# noqa: ...``)."""
  comment = line.partition("#")[2]
  comment = re.sub(r"(noqa|pylint|type)\s*:\s*[\w\-=, ]*\w", "", comment)
  return bool(comment.strip(" #()"))


class _Imports(ast.NodeVisitor):
  """Every import of a module, and whether it sits inside a function or class."""

  def __init__(self):
    self.found: list[tuple[ast.AST, bool]] = []
    self._depth = 0

  def _nested(self, node):
    self._depth += 1
    self.generic_visit(node)
    self._depth -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested

  def visit_Import(self, node):
    self.found.append((node, self._depth > 0))

  visit_ImportFrom = visit_Import


def _scan():
  graph: dict[str, set[str]] = {m: set() for m in MODULES}
  local, uncommented, flags = [], [], []
  for module, path in MODULES.items():
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines()
    tree = ast.parse(src, path)
    visitor = _Imports()
    visitor.visit(tree)
    rel = os.path.relpath(path, ROOT)
    for node, nested in visitor.found:
      targets = _targets(module, node)
      graph[module].update(targets)
      if nested and set((module, t) for t in targets) - ALLOWED_LOCAL:
        local.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
      if nested and not targets:
        name = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
        is_fszjax = name.startswith("fszjax") or getattr(node, "level", 0)
        text = " ".join(lines[node.lineno - 1:node.end_lineno])
        if not is_fszjax and not _says_why(text):
          uncommented.append(f"{rel}:{node.lineno}: {ast.unparse(node)} "
                             "(a lazy import needs a comment naming the heavy optional package)")
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef):
        for stmt in node.body:
          if (isinstance(stmt, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "user_error" for t in stmt.targets)):
            flags.append(f"{rel}:{stmt.lineno}: class {node.name} sets user_error; subclass "
                         "fszjax.errors.UserError instead")
  return graph, local, uncommented, flags


GRAPH, LOCAL, UNCOMMENTED, USER_ERROR_FLAGS = _scan()


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _report(title: str, violations: list[str]) -> str:
  return f"{len(violations)} {title}:\n  " + "\n  ".join(violations)


def test_every_module_has_a_layer():
  missing = sorted(m for m in MODULES if layer_of(m) is None)
  assert not missing, _report("modules without a layer (add them to LAYERS)", missing)


def test_every_layer_pattern_names_a_module():
  stale = [f"{name}: {p}" for name, patterns in LAYERS for p in patterns
           if not any(fnmatch.fnmatchcase(m, p) for m in MODULES)]
  assert not stale, _report("LAYERS patterns that match no module (remove them)", stale)


def test_no_import_cycle():
  cycles = _cycles(GRAPH)
  lines = []
  for comp in cycles:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(GRAPH[a]) if b in members]
    lines.append(f"cycle of {len(comp)}: {' '.join(comp)}\n    edges: " + "; ".join(edges))
  assert not cycles, _report("import cycles", lines)


def test_imports_point_down():
  upward = []
  for module in sorted(GRAPH):
    mine = layer_of(module)
    for target in sorted(GRAPH[module]):
      theirs = layer_of(target)
      if mine and theirs and RANK[theirs] > RANK[mine]:
        upward.append(f"{module} ({mine}) -> {target} ({theirs})")
  assert not upward, _report("imports from a lower layer to a higher one", upward)


def test_internal_imports_at_module_top():
  assert not LOCAL, _report("fszjax-internal imports inside functions (move them to the top)",
                            LOCAL)


def test_lazy_third_party_imports_say_why():
  assert not UNCOMMENTED, _report("lazy imports without a comment", UNCOMMENTED)


def test_one_user_error_mechanism():
  assert not USER_ERROR_FLAGS, _report("user_error attributes", USER_ERROR_FLAGS)


def test_the_checks_see_what_they_check():
  """The scanner itself: it finds the modules, resolves relative and aliased imports, and
  knows the layers (a broken scanner would pass everything)."""
  assert {"fszjax.errors", "fszjax.config", "fszjax.cli", "fszjax.evaluate"} <= set(MODULES)
  assert "fszjax.errors" in GRAPH["fszjax.config"]  # from fszjax.errors import UserError
  assert layer_of("fszjax.models.vit") == "core" and layer_of("fszjax.fewshot.cli") == "top"
  assert layer_of("fszjax.data.cli") == "top" and layer_of("fszjax.fewshot.inner") == "train_eval"
  tree = ast.parse("def f():\n  from . import errors\n  import fszjax.models.vit\n")
  visitor = _Imports()
  visitor.visit(tree)
  got = [(_targets("fszjax.cli", n), nested) for n, nested in visitor.found]
  assert got == [(["fszjax.errors"], True), (["fszjax.models.vit"], True)]
  assert _says_why("import grain  # heavy: the training input pipeline only")
  assert not _says_why("import optax  # noqa: PLC0415") and not _says_why("import json")
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

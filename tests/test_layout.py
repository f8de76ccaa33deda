"""The package's layering: imports point one way, no cycles, no hidden in-package import.

  main, rshash_jax/__init__                      (6)
  serving/, training/, commands                  (5)
  retrieval/                                     (4)
  data/                                          (3)
  models/, parallel/                             (2)
  config_defaults, scratch, untrusted/           (1)
  errors                                         (0)

A module imports modules of a lower layer, or of its own folder. Only main.py and the
package's __init__ import lazily (to keep `--help` and `import rshash_jax` light).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rshash_jax"
LAYERS = {
  "errors": 0,
  "config_defaults": 1,
  "scratch": 1,
  "untrusted": 1,
  "models": 2,
  "parallel": 2,
  "data": 3,
  "retrieval": 4,
  "training": 5,
  "serving": 5,
  "commands": 5,
  "main": 6,
  "__init__": 6,
}
LAZY_OK = {"rshash_jax.main", "rshash_jax"}


def _name(path: pathlib.Path) -> str:
  parts = ("rshash_jax",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _modules():
  return {_name(p): p for p in ROOT.rglob("*.py")}


def _layer(module: str) -> int:
  parts = module.split(".")
  return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def _folder(module: str) -> str:
  parts = module.split(".")
  return ".".join(parts[:2]) if len(parts) > 2 else module


def _imports(path: pathlib.Path, modules):
  """(imported module, line, at module level?) for every rshash_jax import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    targets = []
    if (
      isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rshash_jax"
    ):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        targets.append(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      targets = [a.name for a in node.names if a.name.split(".")[0] == "rshash_jax"]
    for t in targets:
      yield t, node.lineno, id(node) in top


def test_every_module_has_a_layer():
  for name in _modules():
    _layer(name)  # KeyError names a module outside the layering


def test_imports_point_down_or_within_a_folder():
  modules = _modules()
  bad = []
  for name, path in modules.items():
    for target, line, at_top in _imports(path, modules):
      if target == "rshash_jax" and name != "rshash_jax":
        bad.append(f"{name}:{line} imports the package root")
        continue
      same_folder = _folder(target) == _folder(name) and _folder(name) != name
      if not same_folder and _layer(target) >= _layer(name):
        bad.append(f"{name}:{line} imports {target} (layer {_layer(target)} >= {_layer(name)})")
      if not at_top and name not in LAZY_OK:
        bad.append(f"{name}:{line} imports {target} inside a function")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  modules = _modules()
  graph = {
    n: sorted({t for t, _, _ in _imports(p, modules) if t in modules and t != n})
    for n, p in modules.items()
  }
  state = {}

  def visit(n, stack):
    state[n] = "open"
    for m in graph[n]:
      if state.get(m) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
      if m not in state:
        visit(m, stack + [m])
    state[n] = "done"

  for n in graph:
    if n not in state:
      visit(n, [n])

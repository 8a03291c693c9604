"""The layering of the repository, checked statically (ast only: nothing of the project is imported).

docs/architecture.md draws the layers; this test holds the code to them:

  (a) imports run down only, function-level imports included:
        mae_jax.util -> mae_jax.data -> configs -> mae_jax.models -> mae_jax.train
        -> commands (mae_jax.main / summary / compile) -> eval -> mae_jax.demo (+ mae_jax.experiments)
      mae_jax.util and mae_jax.data are jax-free (no jax / flax / optax / orbax anywhere in them);
      data_prep imports only mae_jax.data and mae_jax.util; bench and tests import anything;
  (b) no mae_jax module below the top layer (mae_jax.demo, mae_jax.experiments) imports eval;
  (c) there is no import cycle between modules;
  (d) .py files cite the repo's own docs as `docs/<file>.md` (and a `docs/science.md §N` that
      exists), never the notes outside the repo or internal issue numbers.

A new module under a package that has no layer yet fails (a): give it one in LAYERS.
"""
import ast
import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mae_jax", "configs", "data_prep", "eval", "bench", "tests")
THIS = pathlib.Path(__file__).resolve()

# Prefix -> layer, bottom (0) to top. The longest matching prefix wins.
LAYERS = {
    "mae_jax": 0,  # the empty package __init__
    "mae_jax.util": 0,
    "mae_jax.data": 1,
    "configs": 2,
    "mae_jax.models": 3,
    "mae_jax.train": 4,
    "mae_jax.main": 5,
    "mae_jax.summary": 5,
    "mae_jax.compile": 5,
    "mae_jax.weights": 5,
    "eval": 6,
    "mae_jax.demo": 7,
    "mae_jax.experiments": 7,
}
TOP = ("mae_jax.demo", "mae_jax.experiments")  # the applications: they may import eval
JAX_FREE = ("mae_jax.util", "mae_jax.data")
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "chex")
DATA_PREP_MAY_IMPORT = ("data_prep", "mae_jax.data", "mae_jax.util")
ANYTHING_GOES = ("bench", "tests")


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _py_files():
  for package in PACKAGES:
    yield from sorted((ROOT / package).rglob("*.py"))


MODULES = {_module_name(p): p for p in _py_files()}
PACKAGE_NAMES = {_module_name(p) for p in MODULES.values() if p.name == "__init__.py"}


def _imports(name: str, path: pathlib.Path):
  """(line, imported module name, top-level statement?) of every import in the file.

  `from X import Y` yields X.Y when that is a module of the project, else X. Relative imports
  are resolved against the importing module's package.
  """
  tree = ast.parse(path.read_text(), str(path))
  package = name if name in PACKAGE_NAMES else name.rpartition(".")[0]
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, id(node) in top_level
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        yield node.lineno, full if full in MODULES else base, id(node) in top_level


def _project_target(imported: str):
  """The project module an import resolves to (its nearest existing ancestor), or None."""
  if imported.split(".")[0] not in PACKAGES:
    return None
  parts = imported.split(".")
  while parts:
    candidate = ".".join(parts)
    if candidate in MODULES:
      return candidate
    parts.pop()
  return None


def _layer(name: str):
  best = max((p for p in LAYERS if _under(name, p)), key=len, default=None)
  return None if best is None else LAYERS[best]


GRAPH = {name: [(line, imported, _project_target(imported), top)
                for line, imported, top in _imports(name, path)]
         for name, path in MODULES.items()}


def test_every_module_has_a_place():
  unplaced = [n for n in MODULES
              if _layer(n) is None and not any(_under(n, p) for p in
                                                ("data_prep",) + ANYTHING_GOES)]
  assert not unplaced, (f"modules without a layer: {unplaced}; add their package to LAYERS in "
                        "tests/test_layers.py and to docs/architecture.md")


def test_imports_run_down_only():
  bad = []
  for name, edges in GRAPH.items():
    if any(_under(name, p) for p in ANYTHING_GOES):
      continue
    for line, imported, target, _ in edges:
      if target is None:
        continue
      where = f"{MODULES[name].relative_to(ROOT)}:{line} imports {imported}"
      if _under(name, "data_prep"):
        if not any(_under(target, p) for p in DATA_PREP_MAY_IMPORT):
          bad.append(f"{where} (data_prep may import only mae_jax.data and mae_jax.util)")
        continue
      if any(_under(target, p) for p in ("data_prep",) + ANYTHING_GOES):
        bad.append(f"{where} ({target.split('.')[0]} is not a library layer)")
        continue
      mine, theirs = _layer(name), _layer(target)
      if theirs is not None and mine is not None and theirs > mine:
        bad.append(f"{where} (layer {theirs} above layer {mine})")
  assert not bad, "imports that run up a layer:\n" + "\n".join(bad)


def test_data_and_util_are_jax_free():
  bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {imported}"
         for name, edges in GRAPH.items() if any(_under(name, p) for p in JAX_FREE)
         for line, imported, _, _ in edges if imported.split(".")[0] in JAX_STACK]
  assert not bad, "mae_jax.util and mae_jax.data must not import the jax stack:\n" + "\n".join(bad)


def test_only_the_top_layer_imports_eval():
  bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {imported}"
         for name, edges in GRAPH.items()
         if _under(name, "mae_jax") and not any(_under(name, p) for p in TOP)
         for line, imported, target, _ in edges if target and _under(target, "eval")]
  assert not bad, "only mae_jax.demo (and mae_jax.experiments) may import eval:\n" + "\n".join(bad)


def _find_cycle(graph):
  """One cycle of a {node: set(nodes)} graph as a list of nodes, or None (iterative DFS)."""
  color, parent = {}, {}
  for start in sorted(graph):
    if start in color:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    color[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = 2
        stack.pop()
        continue
      if color.get(child) == 1:
        cycle, at = [], node
        while at != child:
          cycle.append(at)
          at = parent[at]
        return [child] + cycle[::-1] + [child]
      if child not in color:
        color[child], parent[child] = 1, node
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return None


def test_no_import_cycles():
  graph = {name: {t for _, _, t, _ in edges if t is not None and t != name}
           for name, edges in GRAPH.items()}
  cycle = _find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# -- (d) citations ---------------------------------------------------------------------------------
DOC_NAMES = ("science", "interfaces", "data_layouts", "architecture")  # the repo's docs/
# Notes that live outside the repo: a reader of the code has none of them.
_OUTSIDE = re.compile(r"(method|contracts|data_sources|jax_stack)\.md")
_DOC = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*)(" + "|".join(DOC_NAMES) + r")\.md")
_ISSUE = re.compile(r"\b[Ii]ssues? \d")
_SECTION_REF = re.compile(r"docs/science\.md[,:]?\s*(§\s*\d+(?:\.\d+)*(?:\s*(?:[-–,]|and)\s*§?\s*"
                          r"\d+(?:\.\d+)*)*)")


def _method_sections():
  path = ROOT / "docs" / "science.md"
  heads = re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)[.\s]", path.read_text(), re.MULTILINE)
  return set(heads)


def _text_files():
  for path in _py_files():
    if path.resolve() != THIS:
      yield path
  yield from sorted((ROOT / "launch").glob("*"))


def test_docs_are_cited_in_the_repo():
  bad = []
  for path in _text_files():
    if not path.is_file():
      continue
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      where = f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
      for m in _DOC.finditer(line):
        cited = ROOT / "docs" / f"{m.group(2)}.md"
        if m.group(1) != "docs/":
          bad.append(f"{where} (cite docs/{m.group(2)}.md)")
        elif not cited.exists():
          bad.append(f"{where} (docs/{m.group(2)}.md does not exist)")
      if _OUTSIDE.search(line):
        bad.append(f"{where} (a note outside the repo: cite docs/ or state the fact)")
      if _ISSUE.search(line):
        bad.append(f"{where} (an internal issue number: state the fact or cite docs/)")
  assert not bad, "citations outside the repo's docs:\n" + "\n".join(bad)


def test_method_sections_cited_exist():
  sections = _method_sections()
  assert sections, "docs/science.md has no numbered sections"
  bad = []
  for path in _text_files():
    if not path.is_file():
      continue
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      for m in _SECTION_REF.finditer(line):
        for number in re.findall(r"\d+(?:\.\d+)*", m.group(1)):
          if number not in sections:
            bad.append(f"{path.relative_to(ROOT)}:{n}: docs/science.md §{number} does not exist")
  assert not bad, "\n".join(bad)

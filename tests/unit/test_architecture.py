"""The package's structure: layers that import downward only, no import cycles, and family
knowledge kept in the family adapters.

The layer table below is the one docs/architecture.md draws. Every ``import`` statement counts,
including those inside functions (a lazy import is still a dependency), and importing
``lvlm_probe.a.b`` counts as importing the package ``lvlm_probe.a`` too, since Python runs its
``__init__`` first. (The root package is the public facade that re-exports every layer; only an
explicit ``import lvlm_probe`` counts as importing it.)
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import types
from pathlib import Path

import lvlm_probe as lp

PACKAGE = Path(lp.__file__).parent

# Lowest first. A module may import from its own layer (without forming a cycle) and from layers
# below it, never from a layer above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "fileio", "devices")),
    ("tokens", ("layout", "inputs")),
    ("families", ("families",)),
    ("hooks", ("hooks",)),
    ("model", ("model",)),
    ("analysis", ("store", "alignment", "probing", "attribution", "circuits", "viz", "interop", "widgets")),
    ("backends", ("distributed",)),
    ("world", ("worlds",)),
    ("zoo", ("zoo",)),
    ("application", ("bench", "workflows", "report", "demo", "cli")),
]
RANK = {top: rank for rank, (_, tops) in enumerate(LAYERS) for top in tops}
ROOT_RANK = len(LAYERS)  # lvlm_probe/__init__.py: the public facade re-exports every layer


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["lvlm_probe", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _with_parents(name: str) -> list[str]:
    """``lvlm_probe.a.b`` and the packages Python imports first, but the root: ``lvlm_probe.a``."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 1, -1)] or [name]


def _imports(module: str, path: Path) -> set[str]:
    """Every lvlm_probe module that ``module`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            # `from pkg import name`: name is a submodule or an attribute of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name and name.split(".")[0] == "lvlm_probe":
                found.update(n for n in _with_parents(name) if n in MODULES and n != module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT_RANK
    return RANK[parts[1]]


def test_every_module_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(RANK))
    assert not unplaced, f"packages or modules missing from LAYERS: {unplaced}"


def test_no_upward_imports():
    def layer(module: str) -> str:
        return LAYERS[_rank(module)][0] if _rank(module) < ROOT_RANK else "root"

    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})"
              for m, targets in GRAPH.items() for t in targets if _rank(t) > _rank(m)]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    # A package's __init__ importing its own submodules, which import their siblings through the
    # package, is how packages work, not a cycle: edges from a package to its own submodules are
    # left out.
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]


def test_no_single_letter_module_aliases():
    # torch.nn.functional as F is the one convention every reader knows; no other module is renamed
    # to a letter.
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.asname and len(alias.asname) == 1 and \
                            (alias.name, alias.asname) != ("torch.nn.functional", "F"):
                        found.append(f"{module}: import {alias.name} as {alias.asname}")
    assert not found, "\n".join(found)


# --- family knowledge stays in the adapters ----------------------------------------------------
# Outside these folders, code asks the family adapter (its paths and capabilities) and never
# branches on which family a model is.
# The reference model's own definition is a LLaVA by construction, as each tiny builder is its
# family's.
FAMILY_HOMES = ("lvlm_probe.families", "lvlm_probe.zoo.tiny_builders", "lvlm_probe.zoo.shapes_llava")
# Names that contain a family's name but are not a family: the project's own reference model.
NOT_FAMILIES = ("shapes-llava", "shapes_llava")


def _family_words() -> list[str]:
    """Every registered family's name, its model types and its HF classes' stems, lowercased,
    with the trailing version digits dropped too (``gemma3`` -> ``gemma``)."""
    words = set()
    for name in lp.families.names():
        family = lp.families.get(name)
        stems = [c.removesuffix("ForConditionalGeneration") for c in family.hf_classes]
        for word in [name, *family.model_types, *stems]:
            word = word.lower().replace("-", "_")
            words.update({word, re.sub(r"[\d_.]+$", "", word)})
    return sorted(w for w in words if len(w) > 2)


FAMILY_WORDS = re.compile(r"(?<![a-z])(" + "|".join(_family_words()) + r")", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (they may name families as examples)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _family_mentions(source: str) -> list[str]:
    """Family names in a module's code: identifiers, attribute names and string literals, except
    docstrings and comments (which say why, and may name a family as an example)."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        if text is None:
            continue
        for word in NOT_FAMILIES:
            text = text.replace(word, "")
        match = FAMILY_WORDS.search(text.replace("-", "_"))
        if match:
            found.append(f"line {getattr(node, 'lineno', '?')}: {match.group(0)!r} in {text[:60]!r}")
    return found


def test_no_module_outside_families_names_a_family():
    found = [f"{module} {mention}" for module, path in MODULES.items()
             if not module.startswith(FAMILY_HOMES) for mention in _family_mentions(path.read_text())]
    assert not found, "family names outside families/ and zoo/tiny_builders/:\n" + "\n".join(found)


def test_the_family_name_check_finds_planted_names():
    planted = '''
"""Docstrings may say Gemma 3 or Mllama."""
SOFTCAPPED = ("paligemma",)  # a comment may say Qwen2-VL
if "Gemma" in type(norm).__name__ or model.family.name == "mllama":
    pass
ok = "shapes-llava"
'''
    found = _family_mentions(planted)
    assert [m.split(":")[1].split(" in ")[0].strip() for m in found] == ["'paligemma'", "'Gemma'", "'mllama'"]


def test_no_package_attribute_hides_a_submodule():
    # `from .pope import pope` in a package's __init__ makes `lvlm_probe.bench.pope` the function,
    # so `import lvlm_probe.bench.pope as module` would give the function: a module and a name its
    # package exports never share a name.
    hidden = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(module)
        for info in pkgutil.iter_modules(package.__path__):
            value = getattr(package, info.name, None)
            if value is not None and not isinstance(value, types.ModuleType):
                hidden.append(f"{module}.{info.name} is a {type(value).__name__}, not the submodule")
    assert not hidden, "\n".join(hidden)

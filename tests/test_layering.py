"""The layering rules of docs/ARCHITECTURE.md, checked on the source: no import cycle among
chunkvol's modules (imports inside functions count: they are how cycles hide), and no module
uses another module's underscored names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chunkvol"
# Underscored names that are public API of the standard library (namedtuple, os, sys).
# docs/ARCHITECTURE.md's layers, lowest first: a module imports only its own layer and those
# below. A module belongs to the first layer with a prefix of its name.
LAYERS = [
    ("base", ["chunkvol.errors", "chunkvol.clock", "chunkvol.locks", "chunkvol.format", "chunkvol.objstore",
              "chunkvol.network"]),
    ("storage", ["chunkvol.storage", "chunkvol.log", "chunkvol.index"]),
    ("core", ["chunkvol.pool", "chunkvol.volume", "chunkvol.history", "chunkvol.space", "chunkvol.mirror.config"]),
    ("services", ["chunkvol.compaction", "chunkvol.tiering", "chunkvol.heal", "chunkvol.copies", "chunkvol.check",
                  "chunkvol.restore", "chunkvol.diff_transfer", "chunkvol.mirror"]),
    ("commands", ["chunkvol.cli", "chunkvol.operations", "chunkvol.control", "chunkvol.forwarder",
                  "chunkvol.monitor", "chunkvol.__main__"]),
]
STANDARD_PRIVATE = {"_asdict", "_replace", "_fields", "_make", "_field_defaults", "_exit", "_getframe"}


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name, path, tree, known):
    """The chunkvol modules `tree` imports: `from a import b` names a.b when b is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")
                elif source in known:
                    found.add(source)
    found.discard(name)
    return found


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return result


def layer_of(name):
    """The index of `name`'s layer in LAYERS (the package itself: the base)."""
    if name == "chunkvol":
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of LAYERS: add it (and to docs/ARCHITECTURE.md)")


def upward(edges):
    """Imports of a module in a higher layer."""
    return sorted(f"{name} ({LAYERS[layer_of(name)][0]}) imports {other} ({LAYERS[layer_of(other)][0]})"
                  for name, others in edges.items() for other in others if layer_of(other) > layer_of(name))


def own_private_names(tree):
    """Underscored names a module defines itself: its functions, classes, methods,
    assigned names and attributes, and parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return {name for name in names if name.startswith("_")}


def foreign_private_uses(path, tree):
    """`x._name` where the module does not define _name, and `from m import _name`."""
    own = own_private_names(tree) | STANDARD_PRIVATE
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("chunkvol", "nbdkit_plugin")) \
                or isinstance(node, ast.ImportFrom) and node.level:
            uses += [(node.lineno, f"from {node.module} import {alias.name}") for alias in node.names
                     if alias.name.startswith("_") and not alias.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in own:
                uses.append((node.lineno, ast.unparse(node)))
    return [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in uses]


def test_no_import_cycle_in_chunkvol():
    known = modules()
    edges = {name: imported(name, path, ast.parse(path.read_text()), known) for name, path in known.items()}
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    known = modules()
    edges = {name: imported(name, path, ast.parse(path.read_text()), known) for name, path in known.items()}
    found = upward(edges)
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


def test_no_module_uses_another_modules_underscored_names():
    paths = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "nbdkit_plugin").rglob("*.py"))
    found = []
    for path in paths:
        found += foreign_private_uses(path, ast.parse(path.read_text()))
    assert not found, "underscored names used from outside their module:\n" + "\n".join(found)


def test_the_checks_see_what_they_must():
    """The walker itself: a cycle through an import inside a function, and a private call."""
    first = ast.parse("def f():\n    from chunkvol import b\n")
    second = ast.parse("from chunkvol.a import thing\n")
    known = {"chunkvol.a": None, "chunkvol.b": None}
    edges = {"chunkvol.a": imported("chunkvol.a", PACKAGE / "a.py", first, known),
             "chunkvol.b": imported("chunkvol.b", PACKAGE / "b.py", second, known)}
    assert cycles(edges) == [["chunkvol.a", "chunkvol.b"]]
    assert upward({"chunkvol.log.writer": {"chunkvol.pool.journal"}}) == [
        "chunkvol.log.writer (storage) imports chunkvol.pool.journal (core)"]
    tree = ast.parse("import x\nclass A:\n    def _mine(self):\n        return x._theirs() + self._mine()\n")
    assert foreign_private_uses(PACKAGE / "a.py", tree) == ["chunkvol/a.py:4: x._theirs"]

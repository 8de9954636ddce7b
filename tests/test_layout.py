"""The package's layout rules (DESIGN.md): no import cycle, numerics without Flax, no private names used outside.

Read from the source with ``ast`` (no import), so these run in milliseconds.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "anodev2_jax"
NUMERICS = ("rda", "ode", "evolution", "time_kernels", "trajectory", "adjoint", "coupled")


def _top_level_imports(path: Path) -> set[str]:
    """The anodev2_jax modules ``path`` imports at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anodev2_jax"):
            if node.module == "anodev2_jax":
                names.update(a.name for a in node.names)
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("anodev2_jax."))
    return names


def test_no_import_cycle_and_numerics_never_import_flax():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: _top_level_imports(PACKAGE / f"{m}.py") & modules for m in modules}
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) is None:
            state[m] = "open"
            for dep in sorted(graph[m]):
                visit(dep, path + [m])
            state[m] = "done"

    for m in sorted(modules):
        visit(m, [])
    for m in NUMERICS:
        if m in modules:
            text = (PACKAGE / f"{m}.py").read_text()
            assert not re.search(r"^\s*(import flax|from flax)", text, re.M), f"{m}.py imports Flax"


def test_no_private_name_of_the_package_is_used_outside_its_module():
    pattern = re.compile(r"\b(?:anodev2_jax\.)?(" + "|".join(p.stem for p in PACKAGE.glob("*.py")) + r")\._[a-z]\w*")
    patched = re.compile(r"setattr\((\w+), [\"']_[a-z]")  # monkeypatch.setattr(module, "_private", ...)
    offenders = []
    files = [*REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("notebooks/*.ipynb"), *PACKAGE.glob("*.py")]
    for path in [p for p in files if p.name != "test_layout.py"]:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                if path.parent == PACKAGE and path.stem == m.group(1):
                    continue
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {m.group(0)}")
            if path.parent != PACKAGE and patched.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _module_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:  # a name, or a tuple of names (A, B = ...)
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _all_of(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return None


def test_every_module_declares_all_and_documents_its_public_functions_and_classes():
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        public = _all_of(tree)
        if public is None:
            problems.append(f"{path.name}: no __all__")
            continue
        if len(set(public)) != len(public):
            problems.append(f"{path.name}: __all__ lists a name twice")
        missing = set(public) - _module_level_names(tree)
        problems += [f"{path.name}: __all__ names {n!r}, which the module does not define" for n in sorted(missing)]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in public and not ast.get_docstring(node):
                problems.append(f"{path.name}: public {node.name} has no docstring")
    assert not problems, "\n".join(problems)


def test_package_reexports_in_the_name_as_name_form_and_lists_them_in_all():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    reexports = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anodev2_jax."):
            for a in node.names:
                assert a.asname == a.name, f"__init__.py: import {a.name} as {a.name} (the explicit re-export form)"
                reexports.append(a.name)
                path = PACKAGE.joinpath(*node.module.split(".")[1:])  # a module, or a subpackage's __init__
                path = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
                module_all = _all_of(ast.parse(path.read_text()))
                assert a.name in module_all, f"{a.name} is re-exported but not in {node.module}.__all__"
    assert _all_of(tree) == reexports, "__init__.__all__ must list exactly the re-exported names, in import order"

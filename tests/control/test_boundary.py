"""Structure of control/: what it imports, how its modules import each other, what they reach into.

* control/ uses ``llm_safepref.core`` and nothing else of ``llm_safepref`` (statically, by
  ``ast``, and dynamically, by ``sys.modules`` after importing each module in a fresh interpreter).
* control's modules import each other at module level only, and without a cycle (the old
  ``control.data`` <-> ``control.gaits`` cycle hid behind function-level imports).
* No control module reads another's ``_private`` name.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.control

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "control"
FILES = sorted(PACKAGE.rglob("*.py"))  # control/ and its subpackages (control/learners/)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for f in FILES}
#: The package root's own machinery, loaded by ``import llm_safepref`` before any subpackage;
#: standard library only (checked below), so it carries nothing of the language-model side.
PACKAGE_ROOT_MODULES = {"llm_safepref", "llm_safepref._runtime"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of ``tree``."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against the containing package
                    package = module.split(".") if module == "control" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module
                out.append((target, child.lineno, in_function))
                # `from control import tasks` imports the submodule control.tasks.
                out.extend((f"{target}.{a.name}", child.lineno, in_function) for a in child.names
                           if f"{target}.{a.name}" in MODULES)
            visit(child, nested)

    visit(tree, False)
    return out


def _non_core(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "llm_safepref" and (len(parts) < 2 or parts[1] != "core")


def test_the_ast_check_sees_a_violation():
    # The checks below can fail: a module that imports llm_safepref.losses, or imports it in a function.
    tree = ast.parse("import llm_safepref.core\nfrom llm_safepref import losses\ndef f():\n"
                     "    from llm_safepref.data import x\n    import control.data\n")
    found = _imports(tree, "control.x")
    assert [n for n, _, _ in found if _non_core(n)] == ["llm_safepref", "llm_safepref.data"]
    assert [(n, fn) for n, _, fn in found if n.startswith("control")] == [("control.data", True)]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_control_imports_only_the_core_of_llm_safepref(module):
    bad = [f"{MODULES[module].name}:{line} imports {name}" for name, line, _ in _imports(_tree(MODULES[module]), module)
           if _non_core(name)]
    assert not bad, "control/ may import only llm_safepref.core: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_importing_a_control_module_loads_no_other_llm_safepref_module(module):
    code = (f"import sys, json, {module}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llm_safepref'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if m not in PACKAGE_ROOT_MODULES and not m.startswith("llm_safepref.core")] == []


def test_the_package_root_machinery_is_standard_library_only():
    tree = _tree(ROOT / "llm_safepref" / "_runtime.py")
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_control_modules_import_each_other_at_module_level_without_a_cycle():
    graph: dict[str, set[str]] = {}
    late = []
    for module, path in MODULES.items():
        graph[module] = set()
        for name, line, in_function in _imports(_tree(path), module):
            if name in MODULES and name != module:
                if in_function:
                    late.append(f"{path.name}:{line} imports {name} inside a function")
                graph[module].add(name)
    assert not late, "; ".join(late)
    # Depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["control.gaits"] >= {"control.collection"} and graph["control.data"] >= {"control.gaits"}


def _private_reach_ins(tree: ast.AST, module: str, filename: str) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                bad.append(f"{filename}:{node.lineno} reads .{node.attr} of {ast.unparse(owner)}")
        if isinstance(node, ast.ImportFrom):
            bad += [f"{filename}:{node.lineno} imports {a.name} from {node.module}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_the_private_check_sees_a_violation():
    tree = ast.parse("from control.data import _x\nclass A:\n    def f(self, col):\n"
                     "        return self._y + col._obs\n")
    assert len(_private_reach_ins(tree, "control.x", "x.py")) == 2


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_control_module_reads_another_objects_private_names(module):
    bad = _private_reach_ins(_tree(MODULES[module]), module, MODULES[module].name)
    assert not bad, "make these public API: " + "; ".join(bad)

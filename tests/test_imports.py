"""The package's import graph, read statically (ast) from every module's top-level imports.

An edge A -> B means module A's top level imports module B (``import B``, ``from B import x``,
or ``from A import B`` naming a submodule). Imports under ``if TYPE_CHECKING:`` and inside
functions are not edges (those are kept for optional extras and for what the command line's
parser must not load: torch). The implicit import of a module's parent packages is not an edge
either: ``segllm/__init__.py`` names the public API (imported on first use).

The last test runs the parser in a fresh interpreter and checks what it loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import segllm

ROOT = Path(segllm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module
    base = here.split(".")[: len(here.split(".")) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def _imports(node: ast.stmt, here: str, is_package: bool) -> list[str]:
    """The segllm modules that one import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(node.module or "", node.level, here, is_package)
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        # "from package import submodule" loads the package only as the submodule's parent
        return subs if len(subs) == len(node.names) else [base, *subs]
    return []


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import time: the module body and the bodies of its top-level
    ``if`` (except ``if TYPE_CHECKING``) and ``try`` blocks."""
    out = []
    for node in body:
        if isinstance(node, ast.If) and not _is_type_checking(node):
            out += _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
        else:
            out.append(node)
    return out


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in _top_level(tree.body):
            targets.update(m for m in _imports(node, name, path.name == "__init__.py") if m in MODULES and m != name)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    return seen


def test_the_graph_sees_the_package():
    edges = graph()
    assert len(MODULES) > 60 and "segllm.model.segllm" in edges
    assert "segllm.config" in edges["segllm.model.builder"]
    assert "segllm.decoders.hipie.config" in edges["segllm.decoders.registry"]  # from-import of a submodule
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_cycle_among_top_level_imports():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checkpoint_module_imports_no_model_code():
    reached = closure(graph(), "segllm.checkpoint")
    assert not [m for m in reached if m.startswith(("segllm.model", "segllm.decoders.hipie.decoder", "segllm.train"))], reached


def test_configs_do_not_import_decoder_code():
    """Reading a config (segllm.config) reaches the decoders' config modules, not the decoders."""
    reached = closure(graph(), "segllm.config")
    assert {"segllm.decoders.registry", "segllm.decoders.sam.config", "segllm.decoders.hipie.config"} <= reached
    heavy = []
    for m in reached:
        tree = ast.parse(MODULES[m].read_text())
        if any(n.split(".")[0] == "torch" for node in _top_level(tree.body) for n in _imports(node, m, False)):
            heavy.append(m)
    assert not heavy, f"modules that segllm.config imports load torch: {heavy}"


def test_model_and_decoders_do_not_import_training_code():
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith(("segllm.model", "segllm.decoders")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count here too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = _imports(node, name, path.name == "__init__.py")
                offenders += [f"{name} imports {m}" for m in found if m == "segllm.train" or m.startswith("segllm.train.")]
    assert not offenders, offenders


def test_the_model_module_stays_thin():
    """Composition, embedding and decoding only (issue 14): losses, memory, rounds and part
    selection live in their own modules."""
    lines = (ROOT / "model" / "segllm.py").read_text().count("\n")
    assert lines < 300, f"segllm/model/segllm.py has {lines} lines"


def test_the_command_line_parser_and_data_commands_load_neither_torch_nor_transformers(tmp_path):
    # `segllm --help`, a command's --help, argument errors and the data commands (world, data
    # check, generate) answer without the ~3-5 s that importing torch and transformers takes; a
    # model command loads them when it runs
    code = f"""
import sys
import segllm
import segllm.cli
segllm.cli.build_parser().parse_args(["eval", "--benchmark", "mr-refcoco", "--dtype", "bfloat16"])
for argv in (["--help"], ["chat", "--help"], ["bench", "--setting", "int3"]):
    try:
        segllm.cli.main(argv)
    except SystemExit:
        pass
assert segllm.cli.main(["world", {str(tmp_path / "w")!r}, "--train", "2", "--val", "0", "--test", "0", "--heldout", "0"]) == 0
assert segllm.cli.main(["data", "check", {str(tmp_path)!r}, "--benchmark", "mr-refcoco"]) == 1  # nothing there
print(sorted(m for m in ("torch", "transformers", "segllm.commands", "segllm.model.segllm") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert "usage: segllm" in done.stdout and "invalid choice: 'int3'" in done.stderr
    assert (tmp_path / "w" / "train").is_dir() and "wrote train: 2 conversations" in done.stdout


def test_the_lazy_public_names_are_the_modules_own():
    from segllm.model.segllm import SegLLM
    from segllm.session import Session

    assert segllm.SegLLM is SegLLM and segllm.Session is Session
    assert set(segllm.__all__) <= set(dir(segllm))
    assert len(dir(segllm)) == len(set(dir(segllm)))  # a name imported already is listed once
    for name in segllm.__all__:
        assert getattr(segllm, name) is not None
    try:
        segllm.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")

"""The lab's structure: layer 5 never imports the interfaces of layer 6, nothing in the package
sets matplotlib's global backend or uses pyplot, and every module ``torchrun`` can launch ends
through the one exit that survives gloo's shutdown (``posemb.lab.distributed.exit_process``)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "posemb"
#: Layer 6 (docs/architecture.md): what the lab must never import.
INTERFACES = ("posemb.cli", "posemb.plots", "posemb.bench", "posemb.demo", "posemb.rotary", "posemb.integrations")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "lab").glob("*.py")), ids=lambda p: p.name)
def test_the_lab_never_imports_a_higher_layer(path):
    higher = [name for name in _imports(path) if name.startswith(INTERFACES)]
    assert not higher, f"{path.name} imports {higher}"


def test_nothing_sets_the_matplotlib_backend_or_uses_pyplot():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert "matplotlib.use(" not in source, path
        assert not [name for name in _imports(path) if name.startswith("matplotlib.pyplot")], path


def _main_block(tree: ast.Module) -> ast.If | None:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                getattr(node.test.left, "id", None) == "__name__":
            return node
    return None


def test_every_entry_point_ends_through_exit_process():
    entry_points = []
    for path in PACKAGE.rglob("*.py"):
        block = _main_block(ast.parse(path.read_text()))
        if block is None:
            continue
        entry_points.append(path.relative_to(PACKAGE).as_posix())
        calls = [node.func.id for node in ast.walk(block) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name)]
        assert "exit_process" in calls, f"{path} must end with exit_process(main())"
    assert {"cli.py", "lab/train.py"} <= set(entry_points)
    assert (PACKAGE / "lab" / "distributed.py").read_text().count("os._exit(") == 1
    assert sum(p.read_text().count("os._exit(") for p in PACKAGE.rglob("*.py")) == 1, "one home"


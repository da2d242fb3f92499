"""Lower layers never import higher ones (``docs/architecture.md``, "layers").

Every module under ``posemb/`` is parsed with ``ast``; each import, at the top of the file or inside
a function, is mapped to the layer of the module it names, and one that names a higher layer than
its importer fails the test. ``LAYERS`` is the single table of which module is in which layer.
"""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "posemb"

#: module (or package) -> layer; a module takes the layer of its longest listed prefix
LAYERS = {
    "posemb._validation": 0,      # argument checks shared by every layer
    "posemb.functional": 1,       # math
    "posemb.kernels": 2,          # fast paths
    "posemb.registry": 3,         # discovers and builds the schemes
    "posemb.schemes": 3,
    "posemb.model": 4,
    "posemb.lab": 5,
    "posemb.cli": 6,              # interfaces
    "posemb.plots": 6,
    "posemb.bench": 6,
    "posemb.demo": 6,
    "posemb.rotary": 6,
    "posemb.integrations": 6,
    "posemb": 4,                  # the package itself, the facade of layers 1-4 (``posemb.TransformerLM``)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a ``posemb`` module in ``path``, nested ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from posemb.kernels import flex`` imports a module
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return [(line, module) for line, module in found if module == "posemb" or module.startswith("posemb.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not missing, f"modules missing from LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_module_imports_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {module} (layer {layer_of(module)})"
              for line, module in imported_modules(path) if (layer_of(module) or 0) > own]
    assert not upward, f"{module_name(path)} (layer {own}) imports a higher layer: " + "; ".join(upward)


def test_the_check_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    """The parser must catch an upward import hidden in a function or written relatively."""
    for folder in ("posemb", "posemb/functional", "posemb/model"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").touch()
    fake = tmp_path / "posemb" / "functional" / "fake.py"
    (tmp_path / "posemb" / "model" / "cache.py").touch()
    fake.write_text("def f():\n    from ..model import cache\n    import posemb.model.cache\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "posemb")
    assert imported_modules(fake) == [(2, "posemb.model.cache"), (3, "posemb.model.cache")]

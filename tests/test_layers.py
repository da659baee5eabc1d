"""The package's layers point one way: data → models → ops → grad → attacks/saliency →
alignment/evaluate → train/report → CLI/demo. A module may import from its own layer or below,
never from above — also not lazily inside a function, which would only hide a cycle."""

import ast
from pathlib import Path

import pytest

import fastsat

PACKAGE = Path(fastsat.__file__).parent

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("fastsat", "fastsat._checks", "fastsat._io", "fastsat._dist", "fastsat._stats", "fastsat._threads", "fastsat._C"),
    ("fastsat.data",),
    ("fastsat.models",),
    ("fastsat.ops",),
    ("fastsat.grad",),
    ("fastsat.attacks", "fastsat.saliency"),
    ("fastsat.alignment", "fastsat.evaluate"),
    ("fastsat.train", "fastsat.report"),
    ("fastsat.cli", "fastsat.demo", "fastsat.__main__"),
]


def layer_of(module: str) -> int:
    best, level = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, index
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every fastsat import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from fastsat import data` imports the submodule fastsat.data.
            found += [(node.lineno, f"{source}.{alias.name}" if source == "fastsat" else source) for alias in node.names]
    return [(line, name) for line, name in found if name == "fastsat" or name.startswith("fastsat.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_layer_table_covers_the_package():
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_upward_import(path):
    module = module_name(path)
    own = layer_of(module)
    upward = [f"line {line}: {name} (layer {layer_of(name)})" for line, name in imported_modules(path, module)
              if layer_of(name) > own]
    assert not upward, f"{module} (layer {own}) imports from above: {upward}"


def test_checker_sees_an_upward_import(tmp_path):
    """The walker must find imports inside functions and relative ones, or the test above proves nothing."""
    source = tmp_path / "fake.py"
    source.write_text("def f():\n    from fastsat.train import fit\n    from ..cli import main\n")
    found = {name: line for line, name in imported_modules(source, "fastsat.ops.fake")}
    assert found == {"fastsat.train": 2, "fastsat.cli": 3}
    assert layer_of("fastsat.train") > layer_of("fastsat.ops.fake")

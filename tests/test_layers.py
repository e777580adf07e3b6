"""The package's layers never look back: a module imports only from its own layer and the layers below.

Every module under ``src/evl`` is parsed with :mod:`ast` (nothing is imported, so no side effects), each
import is resolved to the ``evl`` module it names, and both ends are mapped to a layer. Imports anywhere in
a module count: at module level, inside functions (the CLI's lazy imports) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "evl"

# Bottom to top. A module belongs to the layer of the longest prefix below that names it (a package
# prefix covers its submodules). A new module must be placed here before this test passes.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Frozen dataclasses and presets, atomic file writes, device/precision choices, the tokenizers (CLIP's,
    # and text_tokenizers.py: those checkpoint folders ship), process settings. recipes.py resolves YAML and
    # --set overrides into config dataclasses: config work.
    (
        "base",
        (
            "evl.config",
            "evl.io",
            "evl.devices",
            "evl.tokenizer",
            "evl.text_tokenizers",
            "evl.positions",
            "evl.runtime",
            "evl.recipes",
        ),
    ),
    # Checkpoint files -> (config, tensors) under our parameter names; no module is built there.
    ("weights", ("evl.weights",)),
    # Lists, decoding, sampling, transforms, datasets; no model. splits.py draws and writes subset lists;
    # synth.py renders synthetic videos and writes their lists: both are data, not models.
    ("video", ("evl.video", "evl.splits", "evl.synth")),
    # nn.Modules built from configs and tensors (models/ops included).
    ("models", ("evl.models",)),
    # Training, evaluation, prediction, feature extraction, metrics, checkpoints.
    ("engine", ("evl.engine",)),
    # Entry points and tools over everything: the package facade (evl/__init__ re-exports models, engine
    # and flops), the CLI, the benchmark and demo runners, and the two model-measuring tools: flops.py
    # (FLOPs on meta tensors) and opcount.py (aten ops a step dispatches) build models to measure them.
    ("top", ("evl", "evl.__main__", "evl.cli", "evl.bench", "evl.demo", "evl.flops", "evl.opcount")),
]

# Imports that still point upwards, each with the reason it is not fixed yet. The list can only shrink:
# the test fails when an entry no longer occurs, so that it is removed with the import it excused.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of the module in ``path`` and whether it is a package (an ``__init__.py``)."""
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _all_modules() -> dict[str, tuple[Path, bool]]:
    return {
        name: (path, is_pkg)
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
        for name, is_pkg in [_module_name(path)]
    }


MODULES = _all_modules()


def layer_of(module: str) -> int:
    """Index into :data:`LAYERS` of the layer that ``module`` belongs to (longest matching prefix)."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise KeyError(module)
    return best


def _resolve(name: str, modules: set[str]) -> str:
    """The module an import of ``name`` loads last: ``name`` itself, else its longest known parent.

    ``from evl.models.evl import EVL`` gives ``evl.models.evl``; ``from evl.models import evl`` is
    resolved by the caller to ``evl.models.evl`` as well; a name that is an attribute of a module
    (``evl.config.ModelConfig``) falls back to that module.
    """
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``evl`` modules that ``source`` (module ``module``) imports, absolute or relative, anywhere."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            names = [f"{target}.{alias.name}" for alias in node.names if alias.name != "*"] or [target]
            names = [n if n in modules else target for n in names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.add(_resolve(name, modules))
    found.discard(module)
    return found


def upward_imports() -> dict[tuple[str, str], str]:
    """Every import from a higher layer, as ``(importer, imported) -> "layer -> layer"``."""
    names = set(MODULES)
    violations = {}
    for module, (path, is_pkg) in MODULES.items():
        own = layer_of(module)
        for target in imported_modules(path.read_text(encoding="utf-8"), module, is_pkg, names):
            if layer_of(target) > own:
                violations[(module, target)] = f"{LAYERS[own][0]} -> {LAYERS[layer_of(target)][0]}"
    return violations


# ----------------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_layer_prefixes_name_existing_modules():
    missing = [p for _, prefixes in LAYERS for p in prefixes if p not in MODULES]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_no_module_imports_from_a_layer_above_its_own():
    unexpected = {k: v for k, v in upward_imports().items() if k not in KNOWN_VIOLATIONS}
    lines = [f"{a} imports {b} ({how})" for (a, b), how in sorted(unexpected.items())]
    assert not lines, "imports from a higher layer:\n" + "\n".join(lines)


def test_known_violations_still_exist():
    # When one is fixed, delete its entry (and the ignore_imports line in pyproject.toml).
    gone = sorted(set(KNOWN_VIOLATIONS) - set(upward_imports()))
    assert not gone, f"these allowed upward imports are gone; remove them from KNOWN_VIOLATIONS: {gone}"


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from evl.models.evl import EVL", "evl.engine.train", False, {"evl.models.evl"}),
        ("from evl.models import evl", "evl.video.lists", False, {"evl.models.evl"}),
        ("from evl.models import EVLThing", "evl.video.lists", False, {"evl.models"}),
        ("import evl.engine.metrics as m", "evl.video.lists", False, {"evl.engine.metrics"}),
        ("from evl.config import ModelConfig", "evl.models.evl", False, {"evl.config"}),
        ("from evl import weights, flops", "evl.config", False, {"evl.weights", "evl.flops"}),
        ("import evl", "evl.config", False, {"evl"}),
        ("from ..engine import metrics", "evl.video.lists", False, {"evl.engine.metrics"}),
        ("from . import relative", "evl.models.ops", True, {"evl.models.ops.relative"}),
        ("from .ops.attention import x", "evl.models.evl", False, {"evl.models.ops.attention"}),
        ("def f():\n    from evl.engine import train\n", "evl.video.lists", False, {"evl.engine.train"}),
        ("if TYPE_CHECKING:\n    import evl.models.evl\n", "evl.weights", False, {"evl.models.evl"}),
        ("import numpy, torch.nn\nfrom typing import Any", "evl.config", False, set()),
    ],
)
def test_imports_are_resolved(source, module, is_package, expected):
    assert imported_modules(source, module, is_package, set(MODULES)) == expected


def test_a_look_back_is_caught():
    source = "def helper():\n    from ..engine.metrics import harmonic_mean\n"
    targets = imported_modules(source, "evl.video.lists", False, set(MODULES))
    assert [layer_of(t) > layer_of("evl.video.lists") for t in targets] == [True]


def terminal_writes(source: str) -> list[int]:
    """Lines of ``source`` that write to the terminal themselves: ``print(...)``, ``<tqdm>.write(...)``
    (a bar's or the class's) and any use of ``sys.stdout`` / ``sys.stderr``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write"
        ):
            target = node.func.value
            if isinstance(target, ast.Name) and target.id in ("tqdm", "bar"):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("stdout", "stderr")
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_engine_never_prints():
    # The engine reports through logging (``evl.*`` loggers); the CLI decides where messages go.
    found = {
        name: lines
        for name, (path, _) in MODULES.items()
        if name.startswith(f"{PACKAGE}.engine")
        for lines in [terminal_writes(path.read_text())]
        if lines
    }
    assert not found, f"terminal writes in the engine (module: lines): {found}"


def test_terminal_writes_are_found():
    source = 'import sys\nprint("a")\ntqdm.write("b", file=sys.stderr)\nbar.write("c")\nf.write("d")\n'
    assert terminal_writes(source) == [2, 3, 3, 4]

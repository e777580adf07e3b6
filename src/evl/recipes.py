"""YAML recipes and ``--set`` overrides, resolved into a :class:`~evl.config.RunConfig`.

A recipe holds up to four sections, each a mapping of one dataclass's fields::

    _base_: k400_b16_8f.yaml        # optional; relative to this file (or a list of such paths)
    backbone: {name: ViT-L/14}      # BackboneSpec
    data: {num_frames: 16}          # DataConfig; also decoder: (DecoderConfig) and train: (TrainConfig)

Bases are deep-merged first and the file itself wins, as with mmaction2's ``_base_``. A run is resolved
from, lowest priority first: the dataclass defaults, the recipe, plain command-line flags, and the
``--set section.key=value`` overrides. Every value is checked against its field's type annotation, and
every error is a :class:`RecipeError` whose one-line message names the file or override and the key path.

``decoder.num_frames`` and ``decoder.num_classes`` are never set by hand: the decoder takes
``data.num_frames`` here, and the class count once the trainer has read the class list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evl.config import (
    RUN_SECTIONS,
    RunConfig,
    run_config_from_dict,
    to_dict,
)
from evl.io import atomic_write_text

__all__ = [
    "SECTIONS",
    "RecipeError",
    "build_run_config",
    "load_recipe",
    "load_resolved",
    "parse_override",
    "save_resolved",
]

SECTIONS: dict[str, type] = RUN_SECTIONS
BASE_KEY = "_base_"

# Fields that follow other settings; setting them by hand could only disagree with what they follow.
_DERIVED: dict[tuple[str, str], str] = {
    ("decoder", "num_frames"): "it follows data.num_frames; set that instead",
    ("decoder", "num_classes"): "it follows the class list (data.classes or the training list)",
}

Recipe = dict[str, dict[str, Any]]


class RecipeError(ValueError):
    """A recipe, override or saved config that cannot be used; the message is one line naming its source."""


# ----------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``2e-4`` and ``1.0e5`` as floats and refuses duplicate keys.

    PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent: ``lr: 2e-4`` would load as
    the string ``"2e-4"``. A repeated key would silently keep its last value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The 1-based line and a one-line description of a YAML error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        return (mark.line + 1 if mark else None), problem
    return None, " ".join(str(exc).split())


def _read_yaml(path: Path) -> dict[Any, Any]:
    """The top-level mapping of a recipe file (empty for an empty file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc)
        where = f"{path}:{line}" if line else f"{path}"
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        sections = ", ".join(SECTIONS)
        raise RecipeError(f"{path}: expected a mapping of sections ({sections}), got {_show(data)}")
    return data


# ---------------------------------------------------------------------------------------------- types


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (config.py's annotations are strings until evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    """``tuple[int, ...] | None`` -> ``[int, ...] or null``: types as a recipe author writes them."""
    if hint is type(None):
        return "null"
    if _is_union(hint):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_describe(args[0])}, ...]"
        return f"[{', '.join(_describe(arg) for arg in args)}]"
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as an instance of ``hint``; TypeError when it is none."""
    if _is_union(hint):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arg in typing.get_args(hint):
            if arg is not type(None):
                with contextlib.suppress(TypeError):
                    return _convert(value, arg)
        raise TypeError
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_convert(item, arg) for item, arg in zip(value, args, strict=True))
    if isinstance(value, bool) and hint is not bool:  # bool is an int subclass: True is not a step count
        raise TypeError
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # steps: 5e4
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise TypeError


def _coerce(value: Any, hint: Any, where: str) -> Any:
    try:
        return _convert(value, hint)
    except TypeError:
        raise RecipeError(f"{where}: expected {_describe(hint)}, got {_show(value)}") from None


def _accepts(hint: Any, kind: type) -> bool:
    return hint is kind or kind in typing.get_args(hint)


# -------------------------------------------------------------------------------------- field lookups


def _suggest(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'lr'?)"`` for the closest valid name, else the list of valid names."""
    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def _section_class(section: object, where: str) -> type:
    if section not in SECTIONS:
        raise RecipeError(f"{where}: unknown section {section!r}{_suggest(section, SECTIONS)}")
    return SECTIONS[section]


def _field_hint(section: str, key: object, where: str) -> Any:
    """The annotation of ``section.key``; unknown and derived fields are errors."""
    hints = _field_hints(_section_class(section, where))
    if key not in hints:
        raise RecipeError(f"{where}: unknown {section} field {key!r}{_suggest(key, hints)}")
    if (section, key) in _DERIVED:
        raise RecipeError(f"{where}: {section}.{key} cannot be set: {_DERIVED[section, key]}")
    return hints[key]


_OVERRIDE_FORM = "expected section.key=value, e.g. train.lr=2e-4"
_FLAG_FORM = "expected a section.key name, e.g. train.lr"


def _split_key(key: str, where: str, form: str) -> tuple[str, str]:
    """``"train.lr"`` -> ``("train", "lr")``; ``form`` says what was expected when it is malformed."""
    section, dot, name = key.strip().partition(".")
    if not (section and dot and name) or "." in name:
        raise RecipeError(f"{where}: {form}")
    return section, name


# -------------------------------------------------------------------------------------------- recipes


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two mappings; ``child`` wins, lists are replaced, not concatenated."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _base_paths(value: Any, path: Path) -> list[Path]:
    """The files named by ``_base_`` (one path or a list), relative to the recipe that names them."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError(f"{path}: {BASE_KEY}: expected a path or a list of paths, got {_show(value)}")
    paths = [path.parent / name for name in names]
    for name, base in zip(names, paths, strict=True):
        if not base.is_file():
            raise RecipeError(f"{path}: {BASE_KEY}: {name!r} not found (looked for {base})")
    return paths


def _check_section(section: Any, values: Any, path: Path) -> dict[str, Any]:
    """One section of a recipe file, every value coerced to its field's type."""
    cls = _section_class(section, f"{path}: {section}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        expected = f"a mapping of {cls.__name__} fields"
        raise RecipeError(f"{path}: {section}: expected {expected}, got {_show(values)}")
    checked = {}
    for key, value in values.items():
        where = f"{path}: {section}.{key}"
        checked[key] = _coerce(value, _field_hint(section, key, where), where)
    return checked


def _load(path: Path, ancestors: tuple[Path, ...]) -> Recipe:
    identity = path.resolve()
    if identity in ancestors:
        cycle = " -> ".join(p.name for p in (*ancestors[ancestors.index(identity) :], identity))
        raise RecipeError(f"{path}: {BASE_KEY}: cycle {cycle}")
    raw = _read_yaml(path)
    recipe: Recipe = {}
    for base in _base_paths(raw.pop(BASE_KEY, []), path):
        recipe = _merge(recipe, _load(base, (*ancestors, identity)))
    own = {section: _check_section(section, values, path) for section, values in raw.items()}
    return _merge(recipe, own)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe and its ``_base_`` files into ``{section: {field: value}}``.

    Values are coerced to their fields' types (lists to tuples, ints to floats where a float is expected).
    Raises :class:`RecipeError` for a missing or unreadable file, invalid YAML (with its line), an unknown
    section or field (with the closest valid name), a value of the wrong type, or a ``_base_`` cycle.
    """
    return _load(find_recipe(path), ())


RECIPE_DIR = Path(__file__).parent / "configs"


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else a recipe shipped with evl (``k400_b16_8f``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix:
        return path
    shipped = RECIPE_DIR / f"{path.name}.yaml"
    return shipped if shipped.is_file() else path


# ------------------------------------------------------------------------------------------ overrides


def _parse_value(raw: str, hint: Any, where: str) -> Any:
    """The YAML value of an override; text stays text for a string field (``data.data_root=2024``)."""
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        if _accepts(hint, str):
            return raw.strip()  # e.g. a path that starts with a YAML indicator such as '@'
        raise RecipeError(f"{where}: invalid value: {_yaml_problem(exc)[1]}") from None
    scalar = isinstance(value, bool | int | float)
    if scalar and _accepts(hint, str) and not _accepts(hint, type(value)):
        return raw.strip()
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=2e-4"`` -> ``("train", "lr", 0.0002)``: a ``--set`` override, typed by its field.

    The value is YAML (numbers, ``true``/``false``, ``null``, ``[0.5, 1.0]``), then coerced to the field's
    annotation. Raises :class:`RecipeError` naming ``text`` for a malformed override, an unknown section or
    field, or a value of the wrong type.
    """
    where = f"--set {text}"
    key, equals, raw = text.partition("=")
    if not equals:
        raise RecipeError(f"{where}: {_OVERRIDE_FORM}")
    section, name = _split_key(key, where, _OVERRIDE_FORM)
    hint = _field_hint(section, name, where)
    return section, name, _coerce(_parse_value(raw, hint, where), hint, where)


# -------------------------------------------------------------------------------------------- resolve


def _blame(section: str, sources: Mapping[tuple[str, str], str]) -> str:
    """Every source that set a field of ``section``, in the order they were applied."""
    related = {key for key in sources if key[0] == section}
    if section == "decoder":
        related.add(("data", "num_frames"))  # the decoder's frame count comes from the data section
    named = dict.fromkeys(source for key, source in sources.items() if key in related)
    return ", ".join(named) or "defaults"


def _construct(section: str, values: Mapping[str, Any], sources: Mapping[tuple[str, str], str]) -> Any:
    try:
        return SECTIONS[section](**values)
    except ValueError as exc:
        raise RecipeError(f"{_blame(section, sources)}: {exc}") from None


def build_run_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    **flags: Any,
) -> RunConfig:
    """Resolve a run: dataclass defaults < ``recipe`` < ``flags`` < ``overrides``.

    Args:
        recipe: a YAML recipe (see :func:`load_recipe`), or None for the defaults alone.
        overrides: ``--set`` texts such as ``"train.lr=2e-4"`` (see :func:`parse_override`).
        **flags: ``"section.key"`` -> value from plain command-line flags; None means "not given".
            Pass them as ``**{"train.lr": 2e-4}``.

    Returns:
        The validated :class:`RunConfig`, with ``decoder.num_frames`` equal to ``data.num_frames``.

    Raises:
        RecipeError: for any problem with an input, naming it; a failed dataclass check names every
            source that set a field of the section concerned.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    values: Recipe = {section: {} for section in SECTIONS}
    sources: dict[tuple[str, str], str] = {}

    def apply(section: str, key: str, value: Any, source: str) -> None:
        values[section][key] = value
        sources[section, key] = source

    if recipe is not None:
        for section, fields in load_recipe(recipe).items():
            for key, value in fields.items():
                apply(section, key, value, str(recipe))
    for flag, value in flags.items():
        if value is not None:
            where = f"flag {flag}"
            section, key = _split_key(flag, where, _FLAG_FORM)
            apply(section, key, _coerce(value, _field_hint(section, key, where), where), where)
    for text in overrides:
        section, key, value = parse_override(text)
        apply(section, key, value, f"--set {text}")

    built = {
        name: _construct(name, values[name], sources) for name in ("backbone", "data", "train", "method")
    }
    values["decoder"]["num_frames"] = built["data"].num_frames
    built["decoder"] = _construct("decoder", values["decoder"], sources)
    return RunConfig(**built)


# -------------------------------------------------------------------------------------- resolved JSON


def save_resolved(run_config: RunConfig, path: str | Path) -> Path:
    """Write ``run_config`` as JSON, atomically (a reader sees the old file or the new one)."""
    return atomic_write_text(path, json.dumps(to_dict(run_config), indent=2) + "\n")


def load_resolved(path: str | Path) -> RunConfig:
    """Read a config written by :func:`save_resolved`, or the ``run`` part of a run directory's config."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: resolved config not found") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read resolved config: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("run"), dict):
        data = data["run"]
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a JSON object of sections, got {_show(data)}")
    try:
        return run_config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{path}: {exc}") from None

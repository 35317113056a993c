"""A recipe file -> (its mapping, where each key is), every failure one ConfigError naming the file and line.

PyYAML's own errors are several lines long (the mark, a caret, the context), a top-level list or scalar
used to end as an "internal error", and a key given twice silently kept its last value.  Here the file is
read as UTF-8 (data/textio.py), composed once into nodes (which carry their lines) and constructed from
them, so every key's line is known for the messages of config.load_recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, Recipe
from .data.textio import read_text


def read_recipe_file(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(the recipe's mapping, {dotted key: "FILE: line N"}); ConfigError naming the file and line otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} not found")
    text = read_text(p, "recipe", error=ConfigError)
    node, data = _compose(p, text)
    if node is None or data is None:  # an empty file (or only comments): the defaults
        return {}, {}
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        kind = "list" if isinstance(node, yaml.SequenceNode) else "single value"
        keys = ", ".join(f.name for f in dataclasses.fields(Recipe))
        raise ConfigError(f"{p}: line {node.start_mark.line + 1}: a recipe is a mapping of keys ({keys}), "
                          f"got a YAML {kind}")
    lines: dict[str, str] = {}
    _key_lines(p, node, "", lines, set())
    return data, lines


def _compose(p: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """(root node, constructed document) of one YAML document; any YAML error as one located line."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters already here
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_problem(p, e, text)) from None
    finally:
        if loader is not None:
            loader.dispose()


def yaml_problem(p: str | Path, e: yaml.YAMLError, text: str = "") -> str:
    """One line for a YAML error: the file, the line and column, PyYAML's problem (and its context's line)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif isinstance(e, yaml.reader.ReaderError):  # a control character: only a position in the text
        line = text.count("\n", 0, e.position) + 1
        where = f"line {line}"
    else:
        where = "?"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in problem:
        problem = "a tab character (YAML indents with spaces, not tabs)"
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and cmark.line != getattr(mark, "line", None):
        problem = f"{ctx} (from line {cmark.line + 1}): {problem}"
    return f"{p}: {where}: invalid YAML: {problem}"


def _key_lines(p: Path, node: yaml.MappingNode, prefix: str, out: dict[str, str], seen: set[int]) -> None:
    """Fill `out` with each dotted key's "FILE: line N"; a key given twice with different values is refused
    naming both lines (YAML would keep the second silently, e.g. a second `train:` section replacing the first)."""
    if id(node) in seen:  # an alias back to a mapping already walked (`&a` ... `*a`)
        return
    seen.add(id(node))
    first: dict[str, tuple[yaml.Node, int]] = {}  # key -> (its value, its line)
    for k, v in node.value:
        key, line = f"{prefix}{k.value}", k.start_mark.line + 1
        if key in first and _plain(first[key][0]) != _plain(v):
            raise ConfigError(f"{p}: lines {first[key][1]} and {line}: {key} is given twice with different "
                              "values; keep one")
        first.setdefault(key, (v, line))
        out.setdefault(key, f"{p}: line {line}")
        if isinstance(v, yaml.MappingNode):
            _key_lines(p, v, key + ".", out, seen)


def _plain(node: yaml.Node, depth: int = 0) -> Any:
    """A comparable form of a node's value (tags and scalars; deep aliases compare as equal)."""
    if depth > 50 or isinstance(node, yaml.ScalarNode):
        return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(node, yaml.SequenceNode):
        return tuple(_plain(n, depth + 1) for n in node.value)
    return tuple((_plain(k, depth + 1), _plain(v, depth + 1)) for k, v in node.value)


def locate(message: str, lines: dict[str, str], overridden: set[str]) -> str:
    """`message` (a ConfigError that starts with a dotted key, as config._validate writes them) prefixed with
    the file and line of that key, when the value came from the file and not from an override."""
    key = message.split(" ", 1)[0].rstrip(":")
    if key in lines and key not in overridden and not message.startswith(lines[key]):
        return f"{lines[key]}: {message}"
    return message


def flat_keys(d: dict, prefix: str = "") -> set[str]:
    """Every dotted key of a nested dict (the overrides), sections included."""
    out = set()
    for k, v in d.items():
        out.add(f"{prefix}{k}")
        if isinstance(v, dict):
            out |= flat_keys(v, f"{prefix}{k}.")
    return out

"""YAML for merge configs: PyYAML's safe loader with the bounds a config file needs.

- aliases may not expand the document past :data:`MAX_NODES` nodes (a "billion laughs" file of
  2 KB would otherwise expand to gigabytes when the config is validated, copied and written);
- a mapping may not repeat a key (PyYAML keeps the last silently; mergekit's pydantic schema
  never sees the first);
- integers beyond ±2**63 are refused (no setting takes one; they overflow later as raw errors);
- numbers as people write them: ``1e-5`` and ``1.5e3`` are floats (YAML 1.2; YAML 1.1 reads strings);
- nesting deeper than Python's recursion allows is refused with a message.
Every refusal is a ``yaml.YAMLError`` naming the line (and the key where there is one).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_NODES = 100_000
"""The most YAML nodes a config may hold once its aliases are expanded."""
MAX_INT = 2**63


class _ConfigLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r} (line "
                    f"{seen[key].start_mark.line + 1} and line {key_node.start_mark.line + 1})", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if abs(value) >= MAX_INT:
            raise yaml.constructor.ConstructorError(None, None, f"integer {node.value[:20]}... is too large "
                                                    "(no setting takes one beyond 2**63)", node.start_mark)
        return value


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _expanded_size(node, memo: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded (shared nodes counted at each use), in linear time."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def _check_size(root) -> None:
    memo: dict[int, int] = {}
    if root is None or _expanded_size(root, memo) <= MAX_NODES:
        return
    where = ""
    if isinstance(root, yaml.MappingNode):
        largest = max(root.value, key=lambda kv: memo.get(id(kv[1]), 0))
        where = f" (under `{largest[0].value}`)"
    raise yaml.YAMLError(f"the document expands to more than {MAX_NODES:,} YAML nodes through its aliases{where}: "
                         "refused (is it a 'billion laughs' file?)")


def load_yaml(text: str) -> Any:
    """The YAML document in ``text``, with the bounds above.

    Raises:
      yaml.YAMLError: invalid YAML or a bound exceeded (the message names the line or key).
    """
    loader = _ConfigLoader(text)
    try:
        try:
            root = loader.get_single_node()
            _check_size(root)
            return None if root is None else loader.construct_document(root)
        except RecursionError:
            raise yaml.YAMLError("the document nests deeper than a config can (Python's recursion limit)") from None
    finally:
        loader.dispose()


__all__ = ["MAX_NODES", "load_yaml"]

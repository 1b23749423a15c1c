"""Safe YAML for configs: no tags that build objects, no duplicate keys, no alias bombs (used by
:mod:`llmvem.config` for files and ``--set`` values)."""

from __future__ import annotations

from typing import Any

import yaml

from llmvem.errors import ConfigError, quote, shorten

__all__ = ["MAX_YAML_NODES", "parse_yaml"]


#: Most YAML nodes a config may expand to through aliases (``*name``); a real config has a few hundred.
MAX_YAML_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (which plain YAML resolves silently, last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key)} (first at line {seen[key].start_mark.line + 1}); "
                    "each key may appear once", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, bound: int) -> int:
    """Nodes of the document with every alias expanded, counted on the shared node graph (capped at
    ``bound + 1``). A recursive alias (``&a [*a]``) expands without end and counts as over the bound."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if not children_done:
            if id(node) in open_nodes:  # reached itself through its own children
                return bound + 1
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
            continue
        open_nodes.discard(id(node))
        sizes[id(node)] = min(bound + 1, 1 + sum(sizes.get(id(k), 1) for k in kids))
    return sizes[id(root)]


def parse_yaml(text: str, source: str) -> Any:
    """Parse config YAML safely: no tags that build objects, no duplicate keys, no alias bombs.

    Raises
    ------
    ConfigError
        Invalid YAML (with line and column), a key given twice in one mapping, or aliases that expand past
        :data:`MAX_YAML_NODES` nodes (the "billion laughs" document).
    """
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML composes nested nodes recursively
            raise ConfigError(f"{source}: nesting deeper than Python can parse; a config needs a few levels") from None
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(f"{source}: aliases (*name) expand to more than {MAX_YAML_NODES} values; a config "
                              "needs no more than a few hundred (an alias bomb?)")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {shorten(problem)}") from exc
    finally:
        loader.dispose()

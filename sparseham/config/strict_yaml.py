"""YAML for configs: safe, without aliases, without duplicate keys, and bounded in size.

A config is a small tree. Aliases let a few lines describe an exponentially large one (a "billion
laughs" document), which the base-chain merge and the error messages would then walk; duplicate
keys silently keep the last value. Both are refused with a one-line error that says where.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_NODES", "load_yaml"]

MAX_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in configs; write the values out",
                event.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} YAML nodes; a config is "
                                              "far smaller", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {str(key)[:60]!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases or duplicate keys, and at most :data:`MAX_NODES` nodes."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)

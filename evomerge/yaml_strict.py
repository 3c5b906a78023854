"""Reading the YAML files a user writes (experiments, search spaces): safe, size-capped, and
strict about duplicate keys (plain ``yaml.safe_load`` keeps the last of two equal keys and says
nothing, so a typo'd override silently wins)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
"""Largest config file read (1 MiB): a search space or experiment is a few KiB; anything far
larger is a mistake, and parsing tens of MB of YAML takes minutes and gigabytes."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with two equal keys."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_text(text: str) -> Any:
    """Parse YAML text; ``yaml.YAMLError`` on a syntax error or a duplicate key."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_file(path: Path) -> Any:
    """Parse a YAML file of at most :data:`MAX_BYTES`; ``yaml.YAMLError`` if it is larger."""
    size = Path(path).stat().st_size
    if size > MAX_BYTES:
        raise yaml.YAMLError(f"the file is {size / 1024 ** 2:.1f} MiB; config files are at most "
                             f"{MAX_BYTES // 1024 ** 2} MiB")
    return load_text(Path(path).read_text())

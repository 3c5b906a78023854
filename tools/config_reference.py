"""The configuration reference, generated from the pydantic models (docs/configuration.md).

Every field of an experiment file and of a search-space file: its type, default, bounds and
description, read from the models themselves, so the reference cannot drift from the code
(``tests/test_config_reference.py`` fails when the file is stale or a field has no description).

    .venv/bin/python tools/config_reference.py          # rewrite docs/configuration.md
    .venv/bin/python tools/config_reference.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "configuration.md"

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from evomerge.config import Experiment  # noqa: E402
from evomerge.space.schema import DataFlowSpace, ParameterSpace  # noqa: E402

HEADER = """# Configuration reference

Generated from the configuration's pydantic models by `tools/config_reference.py`; do not edit
by hand (`tests/test_config_reference.py` fails when this file and the code differ). Every
model is frozen and forbids unknown keys; validation lists every problem at once, each
naming its field. An experiment file is an `Experiment`; `search_space:` names a file holding
a `ParameterSpace` (`kind: ps`) or a `DataFlowSpace` (`kind: dfs`), or holds one inline.
"""


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every model its fields hold, depth first, each once."""
    seen: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for inner in _inner_models(field.annotation):
                walk(inner)

    walk(root)
    return seen


def _inner_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _inner_models(arg)]


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [a for a in args if a is not type(None)]
        text = " \\| ".join(_type(a) for a in parts)
        return text + (" \\| null" if len(parts) < len(args) else "")
    if origin in (tuple, list):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(annotation.__name__,
                                                                                          annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default is not PydanticUndefined else field.default_factory()
    if isinstance(value, BaseModel):
        return "its defaults"
    if value is None:
        return "null"
    if value in ((), {}, [], ""):
        return "empty"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value}`"


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥"),
                           ("pattern", "matches")):
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{sign} `{value}`")
    return ", ".join(out)


def reference() -> str:
    """The whole reference, as markdown."""
    lines = [HEADER]
    models: list[type[BaseModel]] = []
    for root in (Experiment, ParameterSpace, DataFlowSpace):
        models += [m for m in _models(root) if m not in models]
    for model in models:
        doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"## {model.__name__}", "", doc, "", "| field | type | default | bounds | description |",
                  "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_bounds(field)} | "
                         f"{description} |")
        lines.append("")
    return "\n".join(lines)


def undescribed() -> list[str]:
    """``Model.field`` for every field without a description."""
    models: list[type[BaseModel]] = []
    for root in (Experiment, ParameterSpace, DataFlowSpace):
        models += [m for m in _models(root) if m not in models]
    return [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = ap.parse_args()
    text = reference()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            sys.exit(f"{OUT.relative_to(ROOT)} is stale: run python tools/config_reference.py")
        return
    OUT.write_text(text)
    print(f"written to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

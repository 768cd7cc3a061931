"""MkDocs hook: the configuration reference, generated from the dataclasses' `help` metadata at build time.

A page line `<!-- fields: module.Class -->` becomes a table of the fields that class adds to its base (`GRPOConfig`
for the trainer configs; every field for the runner's arguments): name, type, default, allowed values, help. So no
hand-written table can drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

MARKER = re.compile(r"^<!-- fields: ([\w.]+)(?: all)? -->$", re.M)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fields_table(path: str, all_fields: bool = False) -> str:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    prefixes = getattr(cls, "own_field_prefixes", None)
    rows = ["| field | type | default | allowed | help |", "|---|---|---|---|---|"]
    ordered = dataclasses.fields(cls)
    if prefixes:  # grouped as the class lists its prefixes (its own first), declaration order within a group
        ordered = sorted(ordered, key=lambda f: next((i for i, p in enumerate(prefixes) if f.name.startswith(p)), 99))
    for f in ordered:
        if not all_fields and prefixes is not None and not f.name.startswith(prefixes):
            continue
        if f.name.startswith("_"):
            continue
        choices = f.metadata.get("choices")
        allowed = ", ".join(f"`{c}`" for c in choices) if choices else ""
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(
            f"| `{f.name}` | `{_cell(kind)}` | {_cell(_default(f))} | {allowed} | {_cell(f.metadata.get('help', ''))} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: fields_table(m.group(1), m.group(0).endswith(" all -->")), markdown)

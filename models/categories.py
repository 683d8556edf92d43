"""Category sets: the labels a model predicts, and how users name them in files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import fsspec


@dataclass(frozen=True)
class Category:
    """One label a model can emit: COCO `id`, human `name`, `isthing` (instance-able) or stuff."""

    id: int
    name: str
    isthing: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# The synthetic shapes dataset (`rayseg fixtures`): three thing classes drawn on a stuff
# background. Semantic label PNGs store these ids; 0 there means "unlabelled".
SHAPES: list[Category] = [
    Category(1, "circle", True),
    Category(2, "square", True),
    Category(3, "triangle", True),
    Category(4, "background", False),
]


def parse_categories(entries: list) -> list[Category]:
    """Categories from COCO-style dicts (`id`, `name`, optional `isthing`) or plain names.

    Plain names get ids 1..N in order. Duplicate ids are an error.
    """
    categories = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            categories.append(Category(index + 1, entry, True))
        elif isinstance(entry, dict) and "id" in entry and "name" in entry:
            categories.append(Category(int(entry["id"]), str(entry["name"]), bool(entry.get("isthing", True))))
        else:
            raise ValueError(f"category entry {index} must be a name or a dict with 'id' and 'name', got {entry!r}")
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    return categories


def load_category_file(uri: str, storage_options: dict | None = None) -> list[Category]:
    """Read categories from a JSON file: a COCO json (its `categories`) or a bare list."""
    with fsspec.open(uri, "rt", **(storage_options or {})) as f:
        data = json.load(f)
    entries = data["categories"] if isinstance(data, dict) else data
    return parse_categories(entries)

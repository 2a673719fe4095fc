"""Pydantic records ↔ MongoDB documents.

A record is stored as its JSON-mode dump (URLs as strings, enums as ints), plus ``_id``
(taken from one of its fields) and store-only fields whose names start with ``_``
(e.g. ``_done``). Reading drops every ``_``-prefixed key and validates the rest, so a
record read back equals the record written.

*Opaque* fields (a prompt's body, a relay's response) are stored as one JSON string,
``_<field>_json``, and restored on reading: nothing queries inside them, and a document
store that walks nested values element by element (nx-27017 converts and copies every list
item; a prompt body holds a thousand token ids) spends far more on the structure than on
one string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def opaque_key(field: str) -> str:
    return f"_{field}_json"


def to_document(record: BaseModel, *, id_field: str | None = None, opaque: Sequence[str] = (),
                **store_fields: Any) -> dict[str, Any]:
    """``record`` as a document; ``_id`` = ``record.<id_field>``; ``opaque`` fields as JSON
    text; ``store_fields`` must start with ``_``."""
    doc = record.model_dump(mode="json", exclude=set(opaque) if opaque else None)
    for field in opaque:
        doc[opaque_key(field)] = json.dumps(getattr(record, field), separators=(",", ":"))
    if id_field is not None:
        doc["_id"] = doc[id_field]
    for key, value in store_fields.items():
        if not key.startswith("_"):
            raise ValueError(f"store-only field {key!r} must start with '_'")
        doc[key] = value
    return doc


def from_document(model: type[M], doc: Mapping[str, Any]) -> M:
    """The record stored in ``doc`` (``_id`` and other ``_`` fields are dropped, opaque
    fields restored)."""
    fields = {k: v for k, v in doc.items() if not k.startswith("_")}
    for key, value in doc.items():
        if key.startswith("_") and key.endswith("_json") and isinstance(value, str):
            fields[key[1:-5]] = json.loads(value)
    return model.model_validate(fields)


def from_documents(model: type[M], docs: Iterable[Mapping[str, Any]]) -> list[M]:
    return [from_document(model, d) for d in docs]

"""Pydantic records ↔ MongoDB documents.

A record is stored as its JSON-mode dump (URLs as strings, enums as ints), plus ``_id``
(taken from one of its fields) and store-only fields whose names start with ``_``
(e.g. ``_relayed``). Reading drops every ``_``-prefixed key and validates the rest, so a
record read back equals the record written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def to_document(record: BaseModel, *, id_field: str | None = None, **store_fields: Any) -> dict[str, Any]:
    """``record`` as a document; ``_id`` = ``record.<id_field>``; ``store_fields`` must start with ``_``."""
    doc = record.model_dump(mode="json")
    if id_field is not None:
        doc["_id"] = doc[id_field]
    for key, value in store_fields.items():
        if not key.startswith("_"):
            raise ValueError(f"store-only field {key!r} must start with '_'")
        doc[key] = value
    return doc


def from_document(model: type[M], doc: Mapping[str, Any]) -> M:
    """The record stored in ``doc`` (``_id`` and other ``_`` fields are dropped)."""
    return model.model_validate({k: v for k, v in doc.items() if not k.startswith("_")})


def from_documents(model: type[M], docs: Iterable[Mapping[str, Any]]) -> list[M]:
    return [from_document(model, d) for d in docs]

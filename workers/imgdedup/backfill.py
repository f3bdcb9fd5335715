"""Catalog backfill: a manifest of existing images (JSON Lines or CSV) as image events.

A marketplace that adopts imgdedup has a catalog already; its images must be indexed before new
listings are checked against them. A manifest row names one image: ``image_id`` and ``uri`` (or an
``image`` object), optionally ``namespace``, ``op``, ``content_type``, ``sha256``, ``occurred_at``
and, in JSON Lines, ``attributes`` / ``event_id``; further CSV columns become attributes. Rows are
turned into events one at a time, so a manifest of millions of rows takes constant memory.

Event ids are derived from the row's content (namespace, image_id, op, image): publishing the same
manifest again, say after an interrupted run, sends the same event ids, which the worker answers as
redeliveries (same verdict, nothing indexed twice). A row whose image changed gets a new event id
and is indexed anew. Rows carry no ``occurred_at`` unless the manifest gives one: the
end-to-end latency metric measures uploads, not how long a backfill queued.

A row that does not make a valid image-event.v1 is a :class:`Rejected` with its line number, never
an exception, so one bad row cannot stop a backfill.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from imgdedup import messages

#: Row fields that go inside the event's ``image`` object.
IMAGE_FIELDS = ("uri", "content_type", "sha256")
#: Row fields copied to the top level of the event.
EVENT_FIELDS = ("event_id", "image_id", "namespace", "op", "occurred_at", "attributes", "image")
#: Every field a row may name; in CSV any other column becomes an attribute.
ROW_FIELDS = frozenset(IMAGE_FIELDS + EVENT_FIELDS)


@dataclass(frozen=True)
class Rejected:
    line: int  # 1-based line of the manifest (CSV: of the row's first line)
    reason: str
    text: str  # the row as read, so a rejects file can be fixed and published again


def read_rows(stream: TextIO, fmt: str) -> Iterator[tuple[int, dict[str, Any] | Rejected]]:
    """(line, row) per manifest row; ``fmt`` is "jsonl" or "csv" (with a header row)."""
    if fmt == "csv":
        reader = csv.DictReader(stream)
        if reader.fieldnames is None:  # reading the header (so line_num counts it) found an empty file
            return
        line = reader.line_num + 1
        for row in reader:
            yield line, _csv_row(row, line)
            line = reader.line_num + 1
        return
    for line, text in enumerate(stream, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, Rejected(line, f"not JSON: {exc}", text.rstrip("\n"))
            continue
        yield line, row if isinstance(row, dict) else Rejected(line, "not a JSON object", text.rstrip("\n"))


def _csv_row(row: dict[str | None, Any], line: int) -> dict[str, Any] | Rejected:
    if None in row:  # more cells than header columns
        return Rejected(line, "more cells than the header has columns", json.dumps(row, default=str))
    known = {k: v for k, v in row.items() if k in ROW_FIELDS and v not in ("", None)}
    extra = {k: v for k, v in row.items() if k not in ROW_FIELDS and v not in ("", None)}
    return known | ({"attributes": extra} if extra else {})


def to_event(row: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The image event a row stands for (not yet validated)."""
    event = {k: row[k] for k in EVENT_FIELDS if k in row}
    event.setdefault("namespace", namespace)
    event.setdefault("op", "upsert")
    image = {k: row[k] for k in IMAGE_FIELDS if k in row}
    if image and event["op"] != "delete":
        event["image"] = {**event.get("image", {}), **image}
    unknown = sorted(set(row) - ROW_FIELDS)
    if unknown:  # JSON Lines only (CSV puts them in attributes): let the schema name them
        event.update({k: row[k] for k in unknown})
    event.setdefault("event_id", derived_event_id(event))
    return event


def derived_event_id(event: dict[str, Any]) -> str:
    """Same row content, same id: a re-published manifest is a redelivery, not new uploads."""
    basis = json.dumps([event.get("namespace"), event.get("image_id"), event.get("op"), event.get("image")],
                       sort_keys=True, default=str)
    return "backfill-" + hashlib.sha256(basis.encode()).hexdigest()[:32]


def events(rows: Iterable[tuple[int, dict[str, Any] | Rejected]], namespace: str,
           ) -> Iterator[dict[str, Any] | Rejected]:
    """Valid image-event.v1 documents, or a Rejected naming the row and every schema violation."""
    for line, row in rows:
        if isinstance(row, Rejected):
            yield row
            continue
        event = to_event(row, namespace)
        found = messages.problems(messages.IMAGE_EVENT, event)
        yield Rejected(line, "; ".join(found[:5]), json.dumps(row, default=str)) if found else event

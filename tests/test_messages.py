"""The schema files are the rules: their examples must pass, their invalid examples must fail, and the
messages the code builds must conform."""

import json
from datetime import UTC

import pytest

from imgdedup import messages
from imgdedup.errors import DeadLetterError, ErrorCode

SCHEMAS = [messages.IMAGE_EVENT, messages.VERDICT, messages.DEAD_LETTER]


@pytest.mark.parametrize("name", SCHEMAS)
def test_examples_are_valid(name):
    examples = messages.schema(name)["examples"]
    assert examples
    for example in examples:
        assert messages.problems(name, example) == [], example


@pytest.mark.parametrize("name", SCHEMAS)
def test_invalid_examples_are_rejected(name):
    invalid = messages.schema(name)["x-invalid-examples"]
    assert invalid
    for example in invalid:
        assert messages.problems(name, example), f"accepted an invalid {name}: {example}"


def test_dead_letter_codes_match_error_enum():
    codes = messages.schema(messages.DEAD_LETTER)["properties"]["error"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted(c.value for c in ErrorCode)


def test_parse_event_applies_schema_defaults():
    event = messages.parse_event(json.dumps({"event_id": "e1", "image_id": "a", "image": {"data": "AAAA"}}).encode())
    assert (event.namespace, event.op, event.occurred_at, event.attributes) == ("default", "upsert", None, {})
    assert event.key == b"default/a"


def test_parse_event_reads_timezones():
    doc = {"event_id": "e", "image_id": "a", "op": "delete", "occurred_at": "2026-11-22T10:15:01.250+01:00"}
    event = messages.parse_event(json.dumps(doc).encode())
    assert event.occurred_at.utcoffset().total_seconds() == 3600 and event.image is None


@pytest.mark.parametrize("raw, code", [
    (b"\xff\xfe not utf8", ErrorCode.INVALID_JSON),
    (b"{not json", ErrorCode.INVALID_JSON),
    (b"[1, 2]", ErrorCode.SCHEMA_VIOLATION),
    (b'{"event_id": "e", "image_id": "x"}', ErrorCode.SCHEMA_VIOLATION),  # upsert needs an image
    (b'{"event_id": "e", "image_id": "x", "image": {"uri": "gopher://h/a"}}', ErrorCode.SCHEMA_VIOLATION),
    (None, ErrorCode.SCHEMA_VIOLATION),  # a tombstone (null value) is not an event
])
def test_parse_event_failures_carry_codes(raw, code):
    with pytest.raises(DeadLetterError) as info:
        messages.parse_event(raw)
    assert info.value.code is code and info.value.message


def test_built_messages_conform():
    event_doc = messages.make_event("img-1", event_id="e1", namespace="shop", data=b"\x89PNG", sha256="0" * 64,
                                    attributes={"a": "b"})
    assert messages.problems(messages.IMAGE_EVENT, event_doc) == []
    event = messages.parse_event(messages.encode(event_doc))
    verdict = messages.make_verdict(
        event, verdict="near_duplicate", duplicate_of="img-0",
        matches=[{"image_id": "img-0", "signal": "phash", "distance": 3, "canonical": "img-0"}],
        sha256="a" * 64, phash="0123456789abcdef", low_detail=False, features={"phash": "imagehash-phash-8x4+draft256"})
    assert messages.problems(messages.VERDICT, verdict) == []
    assert verdict["latency_ms"] >= 0 and verdict["attributes"] == {"a": "b"}
    dead = messages.make_dead_letter(DeadLetterError(ErrorCode.NOT_AN_IMAGE, "garbage"), key=b"k",
                                     value=messages.encode(event_doc), topic="images", partition=1, offset=7)
    assert messages.problems(messages.DEAD_LETTER, dead) == []
    assert dead["event_id"] == "e1" and dead["source"]["offset"] == 7


def test_dead_letter_of_unreadable_record_has_no_event_id():
    dead = messages.make_dead_letter(DeadLetterError(ErrorCode.INVALID_JSON, "x"), key=None, value=b"\x00\x01")
    assert dead["event_id"] is None and messages.problems(messages.DEAD_LETTER, dead) == []


def test_strict_base64():
    assert messages.decode_base64_strict("aGk=") == b"hi"
    with pytest.raises(DeadLetterError) as info:
        messages.decode_base64_strict("aGk=!!")
    assert info.value.code is ErrorCode.FETCH_FAILED


@pytest.mark.parametrize("stamp, utc", [
    ("2026-11-22t10:15:00z", "2026-11-22T10:15:00+00:00"),  # RFC 3339 allows lower-case T and Z
    ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59+00:00"),  # a leap second: valid RFC 3339, no datetime
    ("2026-11-22T10:15:00.123456789+01:00", "2026-11-22T09:15:00.123456+00:00"),  # nanoseconds
])
def test_parse_event_reads_every_rfc3339_timestamp_the_schema_admits(stamp, utc):
    """The schema's date-time admits these; Python's fromisoformat refuses some. A valid event must
    not take the worker down."""
    doc = {"event_id": "e", "image_id": "a", "op": "delete", "occurred_at": stamp}
    assert messages.problems(messages.IMAGE_EVENT, doc) == []
    occurred = messages.parse_event(json.dumps(doc).encode()).occurred_at
    assert occurred.astimezone(UTC).isoformat() == utc

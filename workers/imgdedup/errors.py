"""Why an event could not get a verdict. Each code is one value of ``error.code`` in
``schemas/dead-letter.v1.json``; a test keeps the two lists equal."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_JSON = "invalid_json"  # the record value is not UTF-8 JSON
    SCHEMA_VIOLATION = "schema_violation"  # JSON, but not an image-event.v1
    URI_NOT_ALLOWED = "uri_not_allowed"  # scheme, path or address refused by policy (SSRF guard, file roots)
    FETCH_FAILED = "fetch_failed"  # could not read the bytes (HTTP error, missing file, bad base64)
    FETCH_TIMEOUT = "fetch_timeout"  # the fetch took longer than fetch_timeout_s
    TOO_LARGE = "too_large"  # more bytes than max_image_bytes
    SHA256_MISMATCH = "sha256_mismatch"  # the event's sha256 differs from the fetched bytes
    NOT_AN_IMAGE = "not_an_image"  # Pillow does not recognise the format
    DECODE_FAILED = "decode_failed"  # recognised, but truncated or corrupt
    TOO_MANY_PIXELS = "too_many_pixels"  # more than max_image_pixels (decompression bomb guard)
    INTERNAL_ERROR = "internal_error"  # a bug or an unexpected failure; the event is kept for replay


class DeadLetterError(Exception):
    """An event that cannot get a verdict: carried to the dead-letter topic with its code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # rebuilt from (code, message) when a decoder process sends one back
        return DeadLetterError, (self.code, self.message)

"""One TorchServe request row -> (image bytes, validated parameters), or a ``RequestError``.

TorchServe hands the handler one dict per request: the raw body under ``body`` (or a multipart
form field under its own name, ``data`` here), a JSON body already parsed into a dict, and each
query-string parameter as its own entry. Everything here is pure and testable without a server.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from handler.answer import RequestError

PARAMETERS = ("score_threshold", "iou_threshold", "max_detections")


@dataclass(frozen=True)
class Params:
    """Per-request knobs with their validated values."""

    score_threshold: float
    iou_threshold: float
    max_detections: int


ECHO_CHARS = 40  # at most this much of a bad value is echoed in an error message


def _text(value) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _echo(value) -> str:
    """A bad value as it may appear in an error message: short, and ASCII with escapes."""
    text = _text(value)
    short = text[:ECHO_CHARS] + ("..." if len(text) > ECHO_CHARS else "")
    return ascii(short)


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        x = float(_text(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise RequestError(400, "invalid_parameter", f"{name} must be a number, got {_echo(value)}") from None
    if isinstance(value, bool) or not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
        bracket = "(" if lo_open else "["
        raise RequestError(400, "invalid_parameter", f"{name} must be in {bracket}{lo}, {hi}], got {x}")
    return x


# The thresholds' ranges, for a request's values and for an archive's defaults alike:
# name -> (low, high, low excluded). An IoU threshold of 0 would suppress every overlapping box.
THRESHOLDS = {"score_threshold": (0, 1, False), "iou_threshold": (0, 1, True)}


def check_threshold(name: str, value) -> float:
    """A score or IoU threshold as a float in its range, else a 400 ``RequestError`` (a ValueError)."""
    lo, hi, lo_open = THRESHOLDS[name]
    return _number(name, value, lo, hi, lo_open)


def parse_params(raw: dict, defaults: Params, max_det_per_image: int) -> Params:
    """Validate the caller's parameters against their ranges; absent ones take ``defaults``."""
    score = raw.get("score_threshold")
    iou = raw.get("iou_threshold")
    max_det = raw.get("max_detections")
    if max_det is not None:
        n = _number("max_detections", max_det, 1, max_det_per_image)
        if n != int(n):
            raise RequestError(400, "invalid_parameter", f"max_detections must be an integer, got {n}")
        max_det = int(n)
    return Params(
        score_threshold=defaults.score_threshold
        if score is None
        else check_threshold("score_threshold", score),
        iou_threshold=defaults.iou_threshold if iou is None else check_threshold("iou_threshold", iou),
        max_detections=defaults.max_detections if max_det is None else max_det,
    )


FORM_URLENCODED = "application/x-www-form-urlencoded"


def media_type(content_type: str | None) -> str:
    """A Content-Type's media type, lower case, without parameters ("" when absent): media types
    are case-insensitive (RFC 9110), so ``Application/JSON; charset=UTF-8`` is ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a structured ``+json`` type (``application/vnd.api+json``), any case.

    TorchServe parses a body into JSON only for the exact spelling ``application/json``; for any
    other it hands the handler bytes, which are parsed here."""
    media = media_type(content_type)
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# MIME base64 (RFC 2045) breaks lines at 76 characters, and ``base64`` prints it so by default;
# these characters between the base64 ones are dropped. Anything else outside the alphabet is refused.
BASE64_SPACE = re.compile(r"[ \t\r\n]+")


def decode_base64(encoded: str) -> bytes:
    """The image of a JSON body's ``image`` field: standard base64, padded, optionally as a
    ``data:`` URL, with spaces and line breaks allowed between characters (MIME base64)."""
    text = encoded.split(",", 1)[-1] if encoded.startswith("data:") else encoded
    try:
        return base64.b64decode(BASE64_SPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", "the 'image' field is not valid base64") from None


def split_request(row: dict, content_type: str | None = None) -> tuple[bytes, dict]:
    """Find the image bytes and the raw parameters in one TorchServe request row.

    ``content_type`` is the request's header. A form-encoded body (what ``curl --data-binary``
    sends unless told otherwise) has been split into text fields by TorchServe before it reaches
    the handler, so it cannot hold an image: refused whole, with a message that says how to send.
    """
    if media_type(content_type) == FORM_URLENCODED:
        raise RequestError(
            415,
            "form_encoded",
            "an application/x-www-form-urlencoded body cannot carry an image: send the bytes with "
            "Content-Type image/jpeg (or application/octet-stream), a multipart field 'data', "
            "or JSON {'image': base64}",
        )
    params = {k: row[k] for k in PARAMETERS if k in row}
    body = row.get("data")
    if body is None:
        body = row.get("body")
    if body is None and "image" in row:
        # one KServe v1 instance {"image": base64, ...}: TorchServe's kserve envelope hands each
        # entry of {"instances": [...]} to the handler as a row of its own
        body = row
    if body is None:
        raise RequestError(400, "empty_body", "the request carried no image (raw body, form field 'data')")
    if isinstance(body, bytes | bytearray) and "data" not in row and is_json(content_type):
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(400, "invalid_json", "the body is not valid UTF-8 JSON") from None
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError:
            raise RequestError(
                415, "not_an_image", "a text body is not an image; send bytes or JSON {'image': base64}"
            ) from None
    if isinstance(body, dict):
        params.update({k: body[k] for k in PARAMETERS if k in body})
        encoded = body.get("image")
        if not isinstance(encoded, str) or not encoded:
            raise RequestError(400, "missing_image", "a JSON body needs an 'image' field holding base64")
        return decode_base64(encoded), params
    if isinstance(body, bytes | bytearray):
        return bytes(body), params
    raise RequestError(400, "invalid_body", f"unsupported request body of type {type(body).__name__}")


# -- request ids ---------------------------------------------------------------------------------------
REQUEST_ID_HEADER = "X-Request-Id"  # what a caller (or a proxy) sends
# What the handler answers it in, besides the JSON's "request_id": TorchServe's frontend overwrites
# an answer's X-Request-Id with its own id for the connection's current request, which is the
# wrong one exactly when a stale answer is delivered; this header travels with the answer itself.
REQUEST_ID_ECHO_HEADER = "X-Client-Request-Id"
# What a caller's id may hold to be echoed: UUIDs, hex, nginx/Envoy ids, dotted/colon-separated
# trace ids. Anything else (CR/LF, quotes, non-ASCII, overlong) is replaced, never echoed, so no
# request byte reaches a response header or the JSON unchecked.
REQUEST_ID_CHARS = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_request_id(value) -> bool:
    return isinstance(value, str) and REQUEST_ID_CHARS.fullmatch(value) is not None


def header(headers: Mapping | None, name: str) -> str | None:
    """Header ``name`` by case-insensitive name: TorchServe keeps the client's spelling, and its
    mapping also holds the form fields (dict values), which are skipped."""
    wanted = name.lower()
    for key, value in (headers or {}).items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def request_id(headers: Mapping[str, str] | None, fallback: str | None = None) -> str:
    """The id an answer carries: the caller's ``X-Request-Id`` (any case) if it is safe, else
    ``fallback`` (TorchServe's own id for the request, the one its logs show) if that is safe,
    else a fresh UUID. Lets a caller (or a proxy) match every answer to its request."""
    value = header(headers, REQUEST_ID_HEADER)
    if valid_request_id(value):
        return value
    return fallback if valid_request_id(fallback) else uuid.uuid4().hex

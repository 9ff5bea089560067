"""Request bodies from outside: JSON objects only, bounded in size and depth, valid text."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

from controlplane.errors import InvalidRequest, TooLarge, UnsupportedMediaType
from controlplane.services import validation_errors

MAX_BODY_BYTES = 4 * 1024 * 1024  # a webhook of 1000 alerts fits; a 50 MB annotation does not
MAX_DEPTH = 32
MAX_ID = 2**63 - 1  # the state store's integer ids: beyond them, nothing exists (404)


class IdConverter(IntegerConverter):
    """`<id:name>`: a positive integer the state store can hold, written as one (ASCII digits,
    no leading zero: `01` or another script's digits are no names of incident 1); anything else
    does not match the route (404), rather than overflowing the database driver (500)."""

    regex = r"[1-9][0-9]*"

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(map, min=1, max=MAX_ID)


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: Any) -> M:
    """`values` (a body, a form, a query string) as `model`, else a 400 naming each field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(validation_errors(exc.errors())) from None


def has_body() -> bool:
    """Whether the request sent a body at all: a length, or a chunked one (no length)."""
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def json_object(what: str = "a JSON object") -> dict[str, Any]:
    """The request's body: `application/json`, at most MAX_BODY_BYTES, UTF-8, nested at most
    MAX_DEPTH deep, every string valid Unicode. Else a 4xx naming what is wrong."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"the body must be application/json ({what})")
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise TooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        body = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_twice
        )
    except RecursionError:
        raise InvalidRequest(f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except DuplicateKey as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be {what}")
    check_depth(body)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class DuplicateKey(ValueError):
    pass


def _no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is refused: parsers disagree on which one wins (here the last did,
    so `{"action": "x", "action": "backup"}` was read as a backup)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("a key appears twice in one object")
    return found


def check_depth(value: Any) -> None:
    """Without recursion: a body nested 100,000 deep is a 400, not a crash."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)

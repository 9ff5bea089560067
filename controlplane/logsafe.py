"""`printable(value)`: a value that came from outside, made safe for one log line."""

from __future__ import annotations

import re

# Control characters (C0, DEL, C1), line and paragraph separators, and lone surrogates: each
# could end a log line early, forge the next one, or not encode at all. Bidi controls too: a
# U+202E in a label shows one name as another in a terminal, as it did on a page.
UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def printable(value: object, limit: int = 500) -> str:
    """`value` as text on one line: unsafe characters escaped (`\\n`, `\\x1b`, `\\ud800`),
    and cut at `limit` characters with an ellipsis."""
    text = str(value)
    cut = len(text) > limit
    text = UNSAFE.sub(_escape, text[:limit])
    return text + "…" if cut else text


def _escape(found: re.Match[str]) -> str:
    return found.group().encode("unicode_escape", "backslashreplace").decode("ascii")

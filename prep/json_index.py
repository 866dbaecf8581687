"""Byte offsets of the elements of a top-level JSON list, found in one streaming pass.

:func:`index_json_list` reads the file in chunks, decodes UTF-8 incrementally and parses one
element at a time with ``json.JSONDecoder.raw_decode`` (the C scanner), keeping only where
each element starts. Memory stays at about one chunk plus the largest element plus 8 bytes
a record, whatever the size of the file. The whole file is still validated: anything that
``json.loads`` would refuse is refused here, with the line and column.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from mvprep.records import json_type_name
from mvshards.storage import Location, open_read, read_range

CHUNK_BYTES = 1 << 20
"""Bytes read at a time (an element longer than this makes the window grow)."""
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_TRUNCATION_MARGIN = 8
"""An error this close to the end of the window may be a token cut by the chunk border."""


class JsonListError(ValueError):
    """The file is not a usable JSON list; the message names the file and the fix."""


class _Window:
    """A decoded window on a UTF-8 file that knows the file byte offset of its read position."""

    def __init__(self, f: BinaryIO, path: Location, start_byte: int, chunk_bytes: int) -> None:
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.text = ""
        self.pos = 0
        """Read position in ``text``."""
        self.byte = start_byte
        """File byte offset of ``text[pos]``."""
        self.eof = False
        self.chunk_bytes = chunk_bytes
        self._grow = chunk_bytes

    def fill(self) -> bool:
        """Drop the consumed text and append the next chunk; False when the file has no more."""
        if self.eof:
            return False
        data = self.f.read(self._grow)
        try:
            new = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise JsonListError(
                f"dataset file {self.path} is not UTF-8 text: {exc.reason} near byte "
                f"{self.byte + len(self.text[self.pos :].encode()) + exc.start}; "
                "save it as UTF-8"
            ) from None
        self.eof = not data
        self.text = self.text[self.pos :] + new
        self.pos = 0
        return True

    def advance(self, new_pos: int) -> None:
        segment = self.text[self.pos : new_pos]
        self.byte += len(segment) if segment.isascii() else len(segment.encode("utf-8"))
        self.pos = new_pos

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            self.advance(_WS.match(self.text, self.pos).end())  # type: ignore[union-attr]
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""

    def value(self) -> Any:
        """Parse the JSON value at the read position and move past it."""
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or (
                    exc.pos >= len(self.text) - _TRUNCATION_MARGIN
                )
                if cut and self._more():
                    continue
                raise self.invalid(exc.msg, exc.pos) from None
            if end > len(self.text) - _TRUNCATION_MARGIN and self._more():  # "-0." may be "-0.5"
                continue
            self._grow = self.chunk_bytes
            self.advance(end)
            return obj

    def _more(self) -> bool:
        self._grow = min(self._grow * 2, 1 << 30)  # long elements: O(n log n), not O(n^2)
        return self.fill()

    def invalid(self, msg: str, pos: int | None = None, hint: str = "") -> JsonListError:
        """The 'not valid JSON' error at window position ``pos`` (default: the read position)."""
        pos = self.pos if pos is None else pos
        byte = self.byte + len(self.text[self.pos : pos].encode("utf-8"))
        line, column = _line_column(self.path, byte)
        return JsonListError(
            f"dataset file {self.path} is not valid JSON (line {line}, column {column}: "
            f"{msg}){hint}"
        )


def _line_column(path: Location, byte: int) -> tuple[int, int]:
    """1-based line and column (in characters) of file byte offset ``byte``."""
    line, line_start, pos = 1, 0, 0
    with open_read(path) as f:
        while pos < byte:
            block = f.read(min(1 << 20, byte - pos))
            if not block:
                break
            line += block.count(b"\n")
            last = block.rfind(b"\n")
            if last >= 0:
                line_start = pos + last + 1
            pos += len(block)
        f.seek(line_start)
        head = f.read(byte - line_start)
    return line, len(head.decode("utf-8", errors="replace")) + 1


def index_json_list(path: Location, chunk_bytes: int = CHUNK_BYTES) -> array:
    """Offsets of the elements of the JSON list in ``path``; raises :class:`JsonListError`.

    Returns ``array('q')`` of ``n + 1`` numbers: element ``i`` starts at byte ``offsets[i]``
    and its bytes, possibly followed by whitespace and a comma, run to ``offsets[i + 1]``;
    ``offsets[n]`` is where the last element ends. An empty list gives ``[start]``.
    """
    with open_read(path) as f:
        head = f.read(len(_BOM))
        start = len(_BOM) if head == _BOM else 0
        f.seek(start)
        window = _Window(f, path, start, chunk_bytes)
        first = window.peek()
        if not first:
            raise JsonListError(
                f"dataset file {path} is empty; it must hold a JSON list of records"
            )
        if first != "[":
            _refuse_non_list(window, first)
        window.advance(window.pos + 1)
        offsets = array("q")
        if window.peek() == "]":
            offsets.append(window.byte)
        else:
            while True:
                if window.peek() == "":
                    raise window.invalid("Expecting value")
                offsets.append(window.byte)
                window.value()
                end = window.byte
                sep = window.peek()
                if sep == "]":
                    offsets.append(end)
                    break
                if sep != ",":
                    raise window.invalid("Expecting ',' delimiter")
                window.advance(window.pos + 1)
        window.advance(window.pos + 1)
        if window.peek() != "":
            raise window.invalid("Extra data")
    return offsets


def _refuse_non_list(window: _Window, first: str) -> None:
    """Raise the right error for a file whose top-level value is not a list."""
    obj = window.value()
    if window.peek() != "":
        hint = "; it looks like JSON Lines: name it .jsonl" if first == "{" else ""
        raise window.invalid("Extra data", hint=hint)
    raise JsonListError(
        f"dataset file {window.path} holds a JSON {json_type_name(obj)}, not a list of "
        "records; wrap the records in [...] (or write one record per line as .jsonl)"
    )


def read_elements(
    path: Location, offsets: Sequence[int], start: int, stop: int
) -> Iterator[tuple[int, Any]]:
    """``(index, parsed element)`` for elements ``[start, stop)``: one seek, one read."""
    if start >= stop:
        return
    base = int(offsets[start])
    block = read_range(path, base, int(offsets[stop]))
    for index in range(start, stop):
        a, b = int(offsets[index]) - base, int(offsets[index + 1]) - base
        text = block[a:b].decode("utf-8")
        yield index, _DECODER.raw_decode(text)[0]

"""STOMP 1.0/1.1/1.2 frame codec: an incremental parser and an encoder, no I/O and no session logic.

A frame on the wire is ``COMMAND EOL *(name ":" value EOL) EOL body NUL``, with EOL ``\\n`` or ``\\r\\n``;
bare EOLs between frames are heart-beats and are skipped. The body is exactly ``content-length`` bytes
when that header is present (it may then contain NUL), otherwise it runs to the first NUL.

Invariants:

- ``StompParser.feed`` is split-invariant: any chunking of a byte stream yields the same frames. Each byte
  is scanned a bounded number of times (``bytes.find`` and compiled regexes from a remembered position),
  so a frame trickling in byte by byte costs linear, not quadratic, time.
- No frame larger than ``max_frame_bytes`` (command line + headers + body) is ever buffered whole: an
  oversized ``content-length`` is refused as soon as the headers are parsed, and an incomplete frame is
  refused as soon as the bytes buffered for it pass the limit.
- Malformed input raises ``StompError`` (never another exception); the parser is then unusable, because
  after a framing error the position of the next frame boundary is unknown.
- Header escaping follows the negotiated version (1.0: none; 1.1: ``\\n \\c \\\\``; 1.2: also ``\\r``),
  except in CONNECT and CONNECTED, which the 1.2 spec excludes so that 1.0 peers can read them.
- ``encode_frame`` never fails on server data: what a version cannot carry in a header (a line break in
  1.0 or in CONNECTED, CR in 1.1, NUL anywhere) is replaced instead, and text that is not encodable
  UTF-8 (a lone surrogate) becomes ``?``. Then ``feed(encode_frame(f))`` gives ``f`` back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

STOMP_VERSIONS: Final = ("1.0", "1.1", "1.2")
HEARTBEAT: Final = b"\n"

# The spec exempts these two from escaping (STOMP 1.2, "Value Encoding"), both ways.
_RAW_COMMANDS: Final = frozenset({"CONNECT", "CONNECTED"})

_COMMAND = re.compile(r"[A-Z]+")
_EOLS = re.compile(rb"(?:\r?\n)*")
# The blank line ending the header section: the EOL of the last line followed by an empty line.
_HEAD_END = re.compile(rb"\n\r?\n")
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_UNESCAPES_11: Final = {"n": "\n", "c": ":", "\\": "\\"}
_UNESCAPES_12: Final = {**_UNESCAPES_11, "r": "\r"}
# Longest content-length worth converting: more digits than any sane limit is "too large" without
# calling int() (which refuses over 4300 digits with a ValueError of its own).
_MAX_LENGTH_DIGITS: Final = 15


class StompError(Exception):
    """A malformed or refused frame; ``str(e)`` is short and fit for an ERROR frame's ``message`` header."""


@dataclass(frozen=True, slots=True)
class StompFrame:
    """One decoded frame. Headers keep wire order and repeats; ``header()`` applies the first-wins rule."""

    command: str
    # Not in repr: headers carry credentials (passcode, Authorization) and the body is a payload, and
    # neither may reach a log line through an f-string or a traceback.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    body: bytes = field(default=b"", repr=False)

    def header(self, name: str) -> str | None:
        """The value of the first ``name`` header (STOMP 1.2: repeated headers, the first one wins)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _unescape(table: dict[str, str]) -> Callable[[str], str]:
    def replace(match: re.Match[str]) -> str:
        try:
            return table[match.group(1)]
        except KeyError:
            raise StompError("undefined escape sequence in a header") from None

    def unescape(text: str) -> str:
        if "\\" not in text:
            return text
        return _ESCAPE.sub(replace, text)

    return unescape


def _verbatim(text: str) -> str:
    return text


_UNESCAPERS: Final[dict[str, Callable[[str], str]]] = {
    "1.0": _verbatim,
    "1.1": _unescape(_UNESCAPES_11),
    "1.2": _unescape(_UNESCAPES_12),
}


class StompParser:
    """Incremental frame parser for one connection; ``feed()`` bytes as they arrive, get whole frames.

    ``version`` (default 1.2) selects the header un-escaping; the session sets it once CONNECT has been
    negotiated (the CONNECT frame itself is never un-escaped, so that order works).
    """

    __slots__ = ("_buf", "_failed", "_max_frame_bytes", "_max_headers", "_pending", "_scan", "_unescape", "_version")

    def __init__(self, *, max_frame_bytes: int, max_headers: int = 64) -> None:
        if max_frame_bytes <= 0 or max_headers < 0:
            raise ValueError("max_frame_bytes must be positive and max_headers non-negative")
        self._max_frame_bytes = max_frame_bytes
        self._max_headers = max_headers
        self._buf = bytearray()
        # Parsed head of the frame being received: (command, headers, body offset, content-length or -1).
        # Offsets are relative to the frame start, which is always the start of _buf between feeds.
        self._pending: tuple[str, tuple[tuple[str, str], ...], int, int] | None = None
        # Where the next search for the head end (or the body's NUL) resumes, relative to the frame start.
        self._scan = 0
        self._failed = False
        self._version = "1.2"
        self._unescape = _UNESCAPERS["1.2"]

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, version: str) -> None:
        if version not in _UNESCAPERS:
            raise ValueError(f"unknown STOMP version {version!r}")
        self._version = version
        self._unescape = _UNESCAPERS[version]

    def feed(self, data: bytes) -> list[StompFrame]:
        """The frames completed by ``data`` (possibly none); raises ``StompError`` on malformed input."""
        if self._failed:
            raise StompError("connection already failed on a malformed frame")
        # Common case: a WebSocket message holding whole frames and nothing buffered. Parse ``data`` in
        # place and copy only a leftover partial frame.
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        frames: list[StompFrame] = []
        pos = 0
        try:
            pos = self._parse(buf, frames)
        except StompError:
            self._failed = True
            self._buf = bytearray()
            raise
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf += memoryview(buf)[pos:]
        return frames

    def _parse(self, buf: bytes | bytearray, frames: list[StompFrame]) -> int:
        """Appends the complete frames of ``buf`` to ``frames``; returns the offset of the unconsumed rest."""
        limit = self._max_frame_bytes
        end = len(buf)
        pos = 0
        while True:
            if self._pending is None:
                match = _EOLS.match(buf, pos)
                pos = match.end() if match else pos
                # Heart-beats only (or a CR whose LF has not arrived): nothing of a frame yet.
                if pos == end or (pos == end - 1 and buf[pos] == 0x0D):
                    return pos
                head_end = _HEAD_END.search(buf, pos + self._scan)
                if head_end is None:
                    if buf.find(b"\0", pos + self._scan) != -1:
                        raise StompError("malformed frame: no blank line after the headers")
                    if end - pos > limit:
                        raise StompError("frame too large")
                    self._scan = max(0, end - pos - 2)
                    return pos
                body_off = head_end.end() - pos
                if body_off > limit:
                    raise StompError("frame too large")
                command, headers = self._parse_head(bytes(buf[pos : head_end.start()]))
                length = _content_length(headers)
                if length >= 0 and body_off + length > limit:
                    raise StompError("frame too large")
                self._pending = (command, headers, body_off, length)
                self._scan = body_off
            command, headers, body_off, length = self._pending
            if length >= 0:
                nul = pos + body_off + length
                if nul >= end:
                    return pos
                if buf[nul] != 0:
                    raise StompError("frame body not followed by NUL (wrong content-length?)")
            else:
                nul = buf.find(b"\0", pos + self._scan)
                if nul == -1:
                    if end - pos > limit:
                        raise StompError("frame too large")
                    self._scan = end - pos
                    return pos
                if nul - pos > limit:
                    raise StompError("frame too large")
            frames.append(StompFrame(command, headers, bytes(buf[pos + body_off : nul])))
            self._pending = None
            self._scan = 0
            pos = nul + 1

    def _parse_head(self, head: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
        if b"\0" in head:
            raise StompError("malformed frame: NUL inside the headers")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise StompError("headers are not valid UTF-8") from None
        lines = text.split("\n")
        command = lines[0].removesuffix("\r")
        if _COMMAND.fullmatch(command) is None:
            raise StompError("malformed frame: bad command line")
        if len(lines) - 1 > self._max_headers:
            raise StompError("too many headers")
        unescape = _verbatim if command in _RAW_COMMANDS else self._unescape
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            colon = line.find(":")
            if colon <= 0:
                raise StompError("malformed header line" if colon else "empty header name")
            headers.append((unescape(line[:colon]), unescape(line[colon + 1 :].removesuffix("\r"))))
        return command, tuple(headers)


def _content_length(headers: tuple[tuple[str, str], ...]) -> int:
    """The first content-length header as an int, -1 when absent."""
    for name, value in headers:
        if name == "content-length":
            if not (value.isascii() and value.isdigit()):
                raise StompError("content-length is not a non-negative integer")
            if len(value) > _MAX_LENGTH_DIGITS:
                raise StompError("frame too large")
            return int(value)
    return -1


def _escape_11(text: str) -> str:
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\n" in text:
        text = text.replace("\n", "\\n")
    if ":" in text:
        text = text.replace(":", "\\c")
    # 1.1 has no escape for CR, and a CR before the line's LF would read as a CRLF line end.
    if "\r" in text:
        text = text.replace("\r", " ")
    return text.replace("\0", "\ufffd") if "\0" in text else text


def _escape_12(text: str) -> str:
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\n" in text:
        text = text.replace("\n", "\\n")
    if ":" in text:
        text = text.replace(":", "\\c")
    if "\r" in text:
        text = text.replace("\r", "\\r")
    return text.replace("\0", "\ufffd") if "\0" in text else text


def _sanitize_raw(text: str) -> str:
    """For headers that cannot be escaped (1.0, CONNECT/CONNECTED): no line break, CR or NUL survives."""
    if "\n" in text or "\r" in text or "\0" in text:
        text = text.replace("\n", " ").replace("\r", " ").replace("\0", "\ufffd")
    return text


def _sanitize_raw_name(text: str) -> str:
    # The first colon ends the name, so one inside a name cannot be sent verbatim either.
    return _sanitize_raw(text).replace(":", " ")


_ESCAPERS: Final[dict[str, tuple[Callable[[str], str], Callable[[str], str]]]] = {
    "1.0": (_sanitize_raw_name, _sanitize_raw),
    "1.1": (_escape_11, _escape_11),
    "1.2": (_escape_12, _escape_12),
}


def encode_frame(
    command: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *, version: str = "1.2"
) -> bytes:
    """The wire form of one frame, NUL-terminated.

    Header names and values are escaped for ``version`` (CONNECT/CONNECTED: sanitised, never escaped).
    A non-empty body gets a ``content-length`` unless the caller gave one (then the caller's is trusted).
    ``command`` is the caller's constant and is written as is.
    """
    if command in _RAW_COMMANDS:
        escape_name, escape_value = _sanitize_raw_name, _sanitize_raw
    else:
        try:
            escape_name, escape_value = _ESCAPERS[version]
        except KeyError:
            raise ValueError(f"unknown STOMP version {version!r}") from None
    parts = [command]
    has_length = False
    for name, value in headers:
        if name == "content-length":
            has_length = True
        parts.append(f"{escape_name(name)}:{escape_value(value)}")
    if body and not has_length:
        parts.append(f"content-length:{len(body)}")
    parts.append("\n")
    head = "\n".join(parts).encode("utf-8", "replace")
    return b"".join((head, body, b"\0"))

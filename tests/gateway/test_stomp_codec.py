"""The STOMP frame codec: framing, per-version header escaping, limits, and the properties the session
relies on (any bytes give frames or StompError; encode then parse is the identity; chunking changes
nothing; an oversized frame is refused before it is buffered whole)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stomp import HEARTBEAT, STOMP_VERSIONS, StompError, StompFrame, StompParser, encode_frame

# Modest and reproducible; no example database written into the working tree.
PROPERTY = settings(max_examples=200, deadline=None, database=None)


def parse(data: bytes, *, version: str = "1.2", max_frame_bytes: int = 65536) -> list[StompFrame]:
    parser = StompParser(max_frame_bytes=max_frame_bytes)
    parser.version = version
    return parser.feed(data)


def feed_chunks(parser: StompParser, data: bytes, cuts: list[int]) -> list[StompFrame]:
    frames: list[StompFrame] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        frames += parser.feed(data[start:cut])
        start = cut
    return frames


# ---------------------------------------------------------------------------------------------- framing


def test_simple_frame_and_header_lookup() -> None:
    """A frame parses into command, ordered headers and body; header() returns the value or None."""
    (frame,) = parse(b"SEND\ndestination:/user/bob/topic/chat\nreceipt:r-1\n\nhello\0")
    assert frame.command == "SEND"
    assert frame.headers == (("destination", "/user/bob/topic/chat"), ("receipt", "r-1"))
    assert frame.body == b"hello"
    assert frame.header("receipt") == "r-1"
    assert frame.header("missing") is None


def test_repeated_header_first_wins() -> None:
    """STOMP 1.2: of repeated headers the first is used, and all stay visible in headers."""
    (frame,) = parse(b"SEND\ndestination:/a\ndestination:/b\n\n\0")
    assert frame.header("destination") == "/a"
    assert frame.headers == (("destination", "/a"), ("destination", "/b"))


def test_crlf_line_ends() -> None:
    """CRLF line ends (STOMP 1.2) are accepted everywhere a LF is, and CR is not part of any value."""
    (frame,) = parse(b"SEND\r\ndestination:/a\r\nx:\r\n\r\nbody\0")
    assert frame.command == "SEND"
    assert frame.headers == (("destination", "/a"), ("x", ""))
    assert frame.body == b"body"


def test_heartbeats_between_frames_are_skipped() -> None:
    """Bare LF and CRLF before, between and after frames are heart-beats, not frames."""
    data = b"\n\r\n\nDISCONNECT\nreceipt:1\n\n\0\n\r\n" + HEARTBEAT + b"ACK\nid:5\n\n\0\r\n"
    assert [f.command for f in parse(data)] == ["DISCONNECT", "ACK"]
    assert parse(HEARTBEAT * 100) == []


def test_heartbeat_crlf_split_across_feeds() -> None:
    """A CR at the end of a feed waits for its LF instead of starting a frame."""
    parser = StompParser(max_frame_bytes=1024)
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\nSEND\n\n\0") == [StompFrame("SEND")]


def test_content_length_body_may_contain_nul() -> None:
    """With content-length the body is exactly that many bytes, NUL included."""
    (frame, after) = parse(b"SEND\ncontent-length:5\n\na\0b\0c\0ACK\nid:1\n\n\0")
    assert frame.body == b"a\0b\0c"
    assert after == StompFrame("ACK", (("id", "1"),))


def test_zero_content_length() -> None:
    (frame,) = parse(b"SEND\ncontent-length:0\n\n\0")
    assert frame.body == b""


def test_body_without_content_length_runs_to_first_nul() -> None:
    """Without content-length the first NUL ends the body; what follows it is the next frame."""
    frames = parse(b"SEND\n\nab\0ACK\n\ncd\0")
    assert [(f.command, f.body) for f in frames] == [("SEND", b"ab"), ("ACK", b"cd")]


def test_body_is_raw_bytes() -> None:
    """The body is not decoded: invalid UTF-8 is fine there."""
    (frame,) = parse(b"SEND\ncontent-length:2\n\n\xff\xfe\0")
    assert frame.body == b"\xff\xfe"


def test_value_keeps_colons_and_spaces() -> None:
    """The first colon separates name and value; values are not trimmed."""
    (frame,) = parse(b"SEND\ndestination: /a:b \n\n\0", version="1.0")
    assert frame.header("destination") == " /a:b "


def test_many_frames_in_one_feed() -> None:
    data = b"".join(encode_frame("SEND", [("n", str(i))], b"x" * i) for i in range(50))
    frames = parse(data)
    assert [f.header("n") for f in frames] == [str(i) for i in range(50)]
    assert [len(f.body) for f in frames] == list(range(50))


def test_incomplete_frame_waits() -> None:
    parser = StompParser(max_frame_bytes=1024)
    assert parser.feed(b"SEND\ndestination:/a\n") == []
    assert parser.feed(b"\nbo") == []
    assert parser.feed(b"dy\0") == [StompFrame("SEND", (("destination", "/a"),), b"body")]


# ---------------------------------------------------------------------------------------------- escaping


def test_unescape_12() -> None:
    (frame,) = parse(b"SEND\na\\cb:x\\ny\\\\z\\rw\n\n\0", version="1.2")
    assert frame.headers == (("a:b", "x\ny\\z\rw"),)


def test_unescape_11_and_cr_escape_undefined() -> None:
    """1.1 defines \\n \\c \\\\ only: \\r is an undefined escape there."""
    (frame,) = parse(b"SEND\na\\cb:x\\ny\\\\z\n\n\0", version="1.1")
    assert frame.headers == (("a:b", "x\ny\\z"),)
    with pytest.raises(StompError):
        parse(b"SEND\nx:a\\rb\n\n\0", version="1.1")


def test_no_unescape_in_10() -> None:
    (frame,) = parse(b"SEND\nx:a\\nb\\c\\q\n\n\0", version="1.0")
    assert frame.header("x") == "a\\nb\\c\\q"


@pytest.mark.parametrize("version", ["1.1", "1.2"])
@pytest.mark.parametrize("value", [b"a\\tb", b"a\\", b"\\", b"\\x"])
def test_undefined_escape_is_an_error(version: str, value: bytes) -> None:
    with pytest.raises(StompError):
        parse(b"SEND\nx:" + value + b"\n\n\0", version=version)


@pytest.mark.parametrize("command", ["CONNECT", "CONNECTED"])
def test_connect_is_never_unescaped(command: str) -> None:
    """STOMP 1.2: CONNECT and CONNECTED headers are not escaped (a 1.0 peer must read them)."""
    data = command.encode() + b"\npasscode:ab\\cd\\q\n\n\0"
    (frame,) = parse(data, version="1.2")
    assert frame.header("passcode") == "ab\\cd\\q"


def test_encode_escapes_per_version() -> None:
    headers = [("a:b", "x\ny\\z\rw")]
    assert encode_frame("MESSAGE", headers, version="1.2") == b"MESSAGE\na\\cb:x\\ny\\\\z\\rw\n\n\0"
    # 1.1 has no CR escape: CR becomes a space rather than a line end.
    assert encode_frame("MESSAGE", headers, version="1.1") == b"MESSAGE\na\\cb:x\\ny\\\\z w\n\n\0"
    # 1.0 has no escaping at all: line breaks become spaces, a colon cannot be in a name.
    assert encode_frame("MESSAGE", headers, version="1.0") == b"MESSAGE\na b:x y\\z w\n\n\0"


def test_encode_connected_not_escaped() -> None:
    data = encode_frame("CONNECTED", [("version", "1.2"), ("server", "beeline:1\\x")], version="1.2")
    assert data == b"CONNECTED\nversion:1.2\nserver:beeline:1\\x\n\n\0"


def test_encode_content_length() -> None:
    assert encode_frame("MESSAGE", [("a", "1")], b"a\0b") == b"MESSAGE\na:1\ncontent-length:3\n\na\0b\0"
    # Empty body: no content-length.
    assert encode_frame("RECEIPT", [("receipt-id", "7")]) == b"RECEIPT\nreceipt-id:7\n\n\0"
    # The caller's content-length is kept, not doubled.
    data = encode_frame("MESSAGE", [("content-length", "2")], b"hi")
    assert data == b"MESSAGE\ncontent-length:2\n\nhi\0"


def test_encode_never_fails_on_odd_text() -> None:
    """NUL and lone surrogates in server data are replaced, and the result still parses."""
    data = encode_frame("MESSAGE", [("x", "a\0b"), ("y", "\ud800")])
    (frame,) = parse(data)
    assert frame.header("x") == "a\ufffdb"
    assert frame.header("y") == "?"


def test_unknown_version_refused() -> None:
    parser = StompParser(max_frame_bytes=10)
    with pytest.raises(ValueError):
        parser.version = "2.0"
    with pytest.raises(ValueError):
        encode_frame("SEND", version="0.9")
    assert STOMP_VERSIONS == ("1.0", "1.1", "1.2")


def test_frame_repr_hides_headers_and_body() -> None:
    """Headers carry credentials and the body a payload: neither appears in repr (and so in logs)."""
    text = repr(StompFrame("CONNECT", (("passcode", "secret-token"),), b"payload"))
    assert "secret-token" not in text
    assert "payload" not in text


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"send\n\n\0", id="lowercase-command"),
        pytest.param(b"SE ND\n\n\0", id="space-in-command"),
        pytest.param(b"SEND\nnocolon\n\n\0", id="header-without-colon"),
        pytest.param(b"SEND\n:value\n\n\0", id="empty-header-name"),
        pytest.param(b"SEND\ncontent-length:-1\n\n\0", id="negative-length"),
        pytest.param(b"SEND\ncontent-length:abc\n\n\0", id="non-numeric-length"),
        pytest.param(b"SEND\ncontent-length: 1\n\nx\0", id="length-with-space"),
        pytest.param(b"SEND\ncontent-length:\xd9\xa3\n\nabc\0", id="non-ascii-digits"),
        pytest.param(b"SEND\ncontent-length:2\n\nabc\0", id="no-nul-after-length"),
        pytest.param(b"SEND\nx:\xff\n\n\0", id="header-not-utf8"),
        pytest.param(b"SEND\ndestination:/a\0", id="no-blank-line"),
        pytest.param(b"SEND\0\n\n\0", id="nul-in-command"),
        pytest.param(b"\rSEND\n\n\0", id="lone-cr"),
        pytest.param(b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\0", id="huge-length-digits"),
    ],
)
def test_malformed_frames(data: bytes) -> None:
    with pytest.raises(StompError) as info:
        parse(data)
    assert str(info.value)


def test_parser_unusable_after_error() -> None:
    parser = StompParser(max_frame_bytes=1024)
    with pytest.raises(StompError):
        parser.feed(b"bad\n\n\0")
    with pytest.raises(StompError):
        parser.feed(b"SEND\n\n\0")


def test_too_many_headers() -> None:
    parser = StompParser(max_frame_bytes=65536, max_headers=3)
    assert len(parser.feed(b"SEND\na:1\nb:2\nc:3\n\n\0")) == 1
    with pytest.raises(StompError):
        parser.feed(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0")


# ---------------------------------------------------------------------------------------------- size limit


def test_frame_at_the_limit_passes_one_over_fails() -> None:
    """max_frame_bytes bounds command line, headers and body together."""
    head = b"SEND\ncontent-length:10\n\n"
    limit = len(head) + 10
    assert parse(head + b"x" * 10 + b"\0", max_frame_bytes=limit)[0].body == b"x" * 10
    with pytest.raises(StompError):
        parse(head + b"x" * 10 + b"\0", max_frame_bytes=limit - 1)
    body_only = b"SEND\n\n" + b"y" * 10 + b"\0"
    assert len(parse(body_only, max_frame_bytes=len(body_only) - 1)) == 1
    with pytest.raises(StompError):
        parse(body_only, max_frame_bytes=len(body_only) - 2)


def test_oversized_content_length_refused_at_headers() -> None:
    """The headers alone are enough to refuse: the body is never awaited."""
    parser = StompParser(max_frame_bytes=1000)
    with pytest.raises(StompError, match="too large"):
        parser.feed(b"SEND\ncontent-length:1000\n\n")


def test_heartbeats_do_not_count_toward_the_limit() -> None:
    parser = StompParser(max_frame_bytes=20)
    for _ in range(100):
        assert parser.feed(b"\r\n" * 50) == []
    assert parser.feed(b"SEND\n\n\0") == [StompFrame("SEND")]


# ---------------------------------------------------------------------------------------------- properties

_cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=8)


@PROPERTY
@given(data=st.binary(max_size=400), cuts=_cuts, version=st.sampled_from(STOMP_VERSIONS))
def test_any_bytes_give_frames_or_stomp_error(data: bytes, cuts: list[int], version: str) -> None:
    """Arbitrary input, in arbitrary chunks, never raises anything but StompError."""
    parser = StompParser(max_frame_bytes=128, max_headers=4)
    parser.version = version
    with contextlib.suppress(StompError):
        feed_chunks(parser, data, [min(c, len(data)) for c in cuts])


_frame_like = st.lists(
    st.one_of(
        st.sampled_from([b"SEND\n", b"\n", b"\r\n", b"\0", b":", b"\\", b"\\n", b"content-length:", b"3", b"x:y\n"]),
        st.binary(max_size=6),
    ),
    max_size=30,
).map(b"".join)


@PROPERTY
@given(data=_frame_like, cuts=_cuts)
def test_frame_like_bytes_give_frames_or_stomp_error(data: bytes, cuts: list[int]) -> None:
    """Near-miss frames (random mixes of the grammar's tokens) also only ever raise StompError."""
    parser = StompParser(max_frame_bytes=64, max_headers=4)
    with contextlib.suppress(StompError):
        feed_chunks(parser, data, [min(c, len(data)) for c in cuts])


_commands = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12)
# Text with the characters escaping must handle well represented; NUL and surrogates excluded (the
# encoder replaces them, so they do not round-trip by design).
_header_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(":\n\r\\ abc-é中"),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    ),
    max_size=12,
)


def _strip_for(version: str, text: str) -> str:
    """What a version can carry: 1.1 has no CR escape, so CR is kept out of generated 1.1 frames."""
    return text.replace("\r", "") if version == "1.1" else text


@st.composite
def frames(draw: st.DrawFn, version: str) -> StompFrame:
    command = draw(_commands.filter(lambda c: c not in ("CONNECT", "CONNECTED")))
    raw = draw(st.lists(st.tuples(_header_text, _header_text), max_size=6))
    headers = tuple((_strip_for(version, n) or "h", _strip_for(version, v)) for n, v in raw if n != "content-length")
    body = draw(st.binary(max_size=64))
    return StompFrame(command, headers, body)


def _expected(frame: StompFrame) -> StompFrame:
    """The parsed form of an encoded frame: a non-empty body gains its content-length header."""
    if not frame.body:
        return frame
    return StompFrame(frame.command, (*frame.headers, ("content-length", str(len(frame.body)))), frame.body)


@pytest.mark.parametrize("version", ["1.1", "1.2"])
@PROPERTY
@given(data=st.data())
def test_encode_then_parse_round_trips(version: str, data: st.DataObject) -> None:
    """encode_frame then feed is the identity, and chunking the stream (with heart-beats) changes nothing."""
    batch = data.draw(st.lists(frames(version), min_size=1, max_size=4))
    beats = data.draw(st.lists(st.sampled_from([b"", b"\n", b"\r\n"]), min_size=len(batch), max_size=len(batch)))
    stream = b"".join(
        beat + encode_frame(f.command, f.headers, f.body, version=version) for beat, f in zip(beats, batch, strict=True)
    )
    expected = [_expected(f) for f in batch]

    whole = StompParser(max_frame_bytes=65536)
    whole.version = version
    assert whole.feed(stream) == expected

    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    chunked = StompParser(max_frame_bytes=65536)
    chunked.version = version
    assert feed_chunks(chunked, stream, cuts) == expected


@PROPERTY
@given(data=st.data())
def test_encode_then_parse_round_trips_10(data: st.DataObject) -> None:
    """1.0 has no escaping: what it can carry (no line breaks, no colon in names) round-trips too."""
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n\r"), max_size=12)
    headers = tuple(
        (name.replace(":", "") or "h", value)
        for name, value in data.draw(st.lists(st.tuples(text, text), max_size=6))
        if name.replace(":", "") != "content-length"
    )
    frame = StompFrame(data.draw(_commands), headers, data.draw(st.binary(max_size=64)))
    parser = StompParser(max_frame_bytes=65536)
    parser.version = "1.0"
    assert parser.feed(encode_frame(frame.command, frame.headers, frame.body, version="1.0")) == [_expected(frame)]


@PROPERTY
@given(
    limit=st.integers(min_value=16, max_value=512),
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200),
    with_length=st.booleans(),
)
def test_oversized_frame_refused_before_buffered_whole(limit: int, sizes: list[int], with_length: bool) -> None:
    """An unterminated frame fed in chunks is refused in the very feed that takes it over the limit."""
    parser = StompParser(max_frame_bytes=limit)
    # With a content-length that is itself over the limit, the error comes as soon as the headers are in.
    head = f"SEND\ncontent-length:{limit + 1}\n\n".encode() if with_length else b"SEND\ndestination:/a\n\n"
    stream = head + b"x" * (limit + 64 * 200)
    fed = 0
    refusal = ""
    for size in [*sizes, len(stream)]:
        try:
            parser.feed(stream[fed : fed + size])
        except StompError as exc:
            refusal = str(exc)
            break
        fed += size
        # A feed that returned normally never left more than the limit buffered for this frame, and a
        # complete head with an oversized content-length is refused at once.
        assert fed <= limit
        assert not (with_length and fed >= len(head))
    assert "too large" in refusal

"""Pure units: envelope codecs, key schema, config loading, client-frame codecs and validation, routing
decisions. No Redis here; everything with Redis is in the other modules of this package."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from shared.config import GatewayConfig, RouterConfig, load
from shared.envelope import Envelope, Recipient, StreamEntry
from shared.errors import ConfigError, EnvelopeDecodeError, InvalidRequest
from shared.keys import Keys
from shared.metrics import LATENCY_BUCKETS, CounterFamily, HistogramFamily
from shared.protocol import (
    ErrorCode,
    JsonCodec,
    MsgpackCodec,
    codec_for,
    dumps_json,
    message_frame,
    parse_send,
)
from shared.routing import LOCAL, ROUTED, STORED, classify
from shared.runtime import new_event_loop


def _slot_tag(key: str) -> str:
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


def test_envelope_round_trip() -> None:
    """An envelope packs to msgpack with short keys and unpacks to an equal value."""
    env = Envelope.create(sender="alice", channel="chat", payload={"text": "hi", "n": [1, 2]})
    packed = env.pack()
    assert set(msgpack.unpackb(packed)) == {"v", "i", "f", "c", "p", "t"}
    assert Envelope.unpack(packed) == env


def test_envelope_decode_error_is_typed() -> None:
    """Garbage raises EnvelopeDecodeError (never a bare msgpack/KeyError)."""
    with pytest.raises(EnvelopeDecodeError):
        Envelope.unpack(b"\xc1garbage")
    with pytest.raises(EnvelopeDecodeError):
        Envelope.unpack(msgpack.packb({"v": 1}))
    with pytest.raises(EnvelopeDecodeError):
        StreamEntry.unpack(b"\xc1")


def test_stream_entry_carries_many_recipients_or_a_command() -> None:
    """One stream entry carries every recipient a node holds, or a disconnect command."""
    env = Envelope.create(sender="a", channel="c", payload=1).pack()
    entry = StreamEntry(envelope=env, recipients=(Recipient("u1", 3, "e1"), Recipient("u2", 9, "e2")))
    assert StreamEntry.unpack(entry.pack()) == entry
    kick = StreamEntry(envelope=None, disconnect_user="bob")
    assert StreamEntry.unpack(kick.pack()) == kick


def test_user_keys_share_one_slot_and_node_keys_another() -> None:
    """Cluster safety: all keys of a user share a hash tag; all keys of a node share the node's tag."""
    k = Keys("p")
    user_keys = [k.user_meta("bob"), k.mailbox("bob"), k.user_presence("bob")]
    assert {_slot_tag(x) for x in user_keys} == {"u:bob"}
    node_keys = [k.node_stream("n1"), k.node_info("n1"), k.node_members("n1"), k.node_reap_lock("n1")]
    assert {_slot_tag(x) for x in node_keys} == {"n:n1"}
    assert len(set(user_keys + node_keys)) == 7
    assert all(x.startswith("p:") for x in user_keys + node_keys + [k.node_registry()])
    before, after = k.node_stream_affixes()  # what the append script builds stream names from
    assert before + "gw-7" + after == k.node_stream("gw-7")


def test_config_env_flags_and_invariants() -> None:
    """Settings come from BEELINE_* variables; missing secrets and bad values fail at load."""
    cfg = load(GatewayConfig, {"BEELINE_JWT_SECRET": "s", "BEELINE_NODE_ID": "n1", "BEELINE_HEARTBEAT_SECONDS": "0.5"})
    assert cfg.port == 8080
    assert cfg.heartbeat_interval_s == 0.5
    assert cfg.node_dead_after_s == 1.0
    assert load(RouterConfig, {"BEELINE_API_KEYS": "a, b"}).api_keys == ("a", "b")
    assert load(RouterConfig, {"BEELINE_API_KEYS": "a"}).port == 8090
    with pytest.raises(ConfigError, match="JWT"):
        load(GatewayConfig, {"BEELINE_NODE_ID": "n1"})
    with pytest.raises(ConfigError, match="API_KEYS"):
        load(RouterConfig, {})
    with pytest.raises(ConfigError):
        load(RouterConfig, {"BEELINE_API_KEYS": "a", "BEELINE_ROUTING": "gossip"})
    with pytest.raises(ConfigError):
        load(RouterConfig, {"BEELINE_API_KEYS": "a", "BEELINE_HEARTBEAT_SECONDS": "soon"})
    with pytest.raises(ConfigError):
        load(GatewayConfig, {"BEELINE_JWT_SECRET": "s", "BEELINE_NODE_ID": "bad{id}"})


def test_codecs_round_trip_and_reject_bad_frames() -> None:
    """JSON and msgpack codecs encode frames and map bad input to stable error codes."""
    json_codec, mp_codec = JsonCodec(), MsgpackCodec()
    frame = {"type": "ack", "seq": 3}
    assert json_codec.decode(json_codec.encode(frame).decode()) == frame
    assert mp_codec.decode(mp_codec.encode(frame)) == frame
    assert codec_for(None).name == "beeline.v1.json"
    assert codec_for("beeline.v1.msgpack").binary
    cases = [
        (json_codec, "not json", ErrorCode.BAD_FRAME),
        (json_codec, "[1, 2]", ErrorCode.BAD_FRAME),
        (json_codec, b"\x81", ErrorCode.WRONG_FRAME_KIND),
        (mp_codec, "{}", ErrorCode.WRONG_FRAME_KIND),
        (mp_codec, b"\xc1", ErrorCode.BAD_FRAME),
        (mp_codec, msgpack.packb([1]), ErrorCode.BAD_FRAME),
    ]
    for codec, data, code in cases:
        with pytest.raises(InvalidRequest) as info:
            codec.decode(data)
        assert info.value.code == code


def test_json_codec_base64s_binary_payloads() -> None:
    """A binary payload from a msgpack client reaches JSON clients as base64 text."""
    env = Envelope.create(sender="a", channel="c", payload=b"\x00\x01")
    text = JsonCodec().encode(message_frame(env, Recipient("b", 1, "e"))).decode()
    assert '"payload":"AAE="' in text


def test_parse_send_validation() -> None:
    """`to` may be a user or a list (deduplicated, order kept); bad fields get invalid_field."""
    req = parse_send({"to": ["b", "a", "b"], "channel": "c", "payload": None}, max_receivers=5)
    assert req.to == ("b", "a")
    assert parse_send({"to": "a", "channel": "c", "payload": 1}, max_receivers=5).to == ("a",)
    bad = [
        {"to": 1, "channel": "c", "payload": 1},
        {"to": [], "channel": "c", "payload": 1},
        {"to": [""], "channel": "c", "payload": 1},
        {"to": "a", "channel": 5, "payload": 1},
        {"to": "a", "payload": 1},
        {"to": "a", "channel": "c"},
    ]
    for body in bad:
        with pytest.raises(InvalidRequest) as info:
            parse_send(body, max_receivers=5)
        assert info.value.code == ErrorCode.INVALID_FIELD, body
    with pytest.raises(InvalidRequest) as info:
        parse_send({"to": list("abcdef"), "channel": "c", "payload": 1}, max_receivers=5)
    assert info.value.code == ErrorCode.TOO_MANY_RECEIVERS


def test_classify_statuses() -> None:
    """local: every live connection on the sender's node; routed: one elsewhere; stored: none online."""
    assert classify([], "n1") == STORED
    assert classify(["n1"], "n1") == LOCAL
    assert classify(["n1", "n2"], "n1") == ROUTED
    assert classify(["n2"], None) == ROUTED
    assert classify(["n1"], None) == ROUTED


def test_event_loop_setting() -> None:
    """BEELINE_EVENT_LOOP picks the loop (uvloop is a dependency here); a typo stops the process at
    start, and ``auto`` means uvloop when it is installed."""
    import uvloop  # a dependency on Linux: a missing one must fail the test, not skip it

    assert load(RouterConfig, {"BEELINE_API_KEYS": "k" * 32}).event_loop == "auto"
    with pytest.raises(ConfigError, match="BEELINE_EVENT_LOOP"):
        load(RouterConfig, {"BEELINE_API_KEYS": "k" * 32, "BEELINE_EVENT_LOOP": "trio"})
    for kind, expected in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, expected), (kind, loop)
            if kind == "asyncio":
                assert not isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_drain_window_must_fit_in_the_shutdown_timeout() -> None:
    """The drain (window + the last socket's flush) must fit in its share of the shutdown timeout, or the
    stop would cut the drain short: refused at start with both settings named."""
    base = {"BEELINE_JWT_SECRET": "s" * 32, "BEELINE_NODE_ID": "g1"}
    ok = load(GatewayConfig, {**base, "BEELINE_DRAIN_WINDOW_SECONDS": "5", "BEELINE_SHUTDOWN_TIMEOUT_SECONDS": "15"})
    assert ok.drain_timeout_s == pytest.approx(10.5)
    with pytest.raises(ConfigError, match=r"BEELINE_DRAIN_WINDOW_SECONDS.*BEELINE_SHUTDOWN_TIMEOUT_SECONDS"):
        load(GatewayConfig, {**base, "BEELINE_DRAIN_WINDOW_SECONDS": "9", "BEELINE_SHUTDOWN_TIMEOUT_SECONDS": "10"})


def test_json_frames_and_answers_are_compact_utf8() -> None:
    """Compact UTF-8, binary values as base64, non-string map keys as strings (msgpack allows them)."""
    assert dumps_json({"é": [1, None], 2: b"\x00\x01"}) == '{"é":[1,null],"2":"AAE="}'.encode()
    assert JsonCodec().encode({"type": "ping"}) == b'{"type":"ping"}'


def test_lean_metric_families_export_exactly_as_prometheus_client() -> None:
    """The hot-path counters and histograms of shared.metrics are plain numbers, not prometheus_client's
    locked children; a scrape must not tell them apart (names, labels, buckets, values, _created)."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counters = (
        Counter("beeline_x_total", "Doc.", ["service", "outcome"], registry=theirs),
        CounterFamily("beeline_x_total", "Doc.", ["service", "outcome"], registry=ours),
    )
    histograms = (
        Histogram("beeline_y_seconds", "Doc.", ["node"], buckets=LATENCY_BUCKETS, registry=theirs),
        HistogramFamily("beeline_y_seconds", "Doc.", ["node"], buckets=LATENCY_BUCKETS, registry=ours),
    )
    observed = (0.0, 0.0001, 0.00011, 0.001, 0.7, 30.0, 31.0, 1e9)  # on, between and beyond the bounds
    for counter in counters:
        counter.labels("router", "routed").inc()
        counter.labels("router", "routed").inc(2.5)
        counter.labels("router", "stored")  # created at 0
    for histogram in histograms:
        for value in observed:
            histogram.labels("gw1").observe(value)
        histogram.labels("gw2")

    def text(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert text(ours) == text(theirs)
    for histogram in histograms:
        histogram.labels("gw3").observe(float("nan"))  # in no bucket; the sum becomes NaN
    assert text(ours) == text(theirs)
    created = [line for line in generate_latest(ours).decode().splitlines() if "_created{" in line]
    assert len(created) == 5
    with pytest.raises(ValueError):
        counters[1].labels("router", "routed").inc(-1)
    with pytest.raises(ValueError):
        counters[1].labels("router")

"""The suite's own Redis and service processes: a port taken between picking it and binding it must not
fail a test (seen in CI, when a cluster node's port was another node's bus port), and a server that
cannot start must fail at once with its log, leaving no process behind."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests import support
from tests.support import Cluster, RedisServer, ServerExited, _ephemeral_ports_start, free_cluster_port, free_port

pytestmark = pytest.mark.redis


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_picked_port_taken_before_the_first_start_is_picked_again(taken_port: int) -> None:
    picks = iter([taken_port])
    server = RedisServer(pick_port=lambda: next(picks, None) or free_port())
    assert server.port == taken_port
    try:
        server.start()
        assert server.port != taken_port
        assert server.ping()
    finally:
        server.cleanup()


def test_a_given_port_that_is_taken_fails_at_once_with_the_log(taken_port: int) -> None:
    server = RedisServer(port=taken_port)
    try:
        with pytest.raises(ServerExited) as exited:
            server.start()
        assert exited.value.port_taken
        assert server.proc is None or server.proc.poll() is not None
    finally:
        server.cleanup()


def test_a_restart_keeps_its_port() -> None:
    """Clients know a started server's port: a restart whose port was taken meanwhile fails, with the
    log, instead of moving to another port the clients would not find."""
    server = RedisServer().start()
    try:
        port = server.port
        server.stop()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            with pytest.raises(ServerExited) as exited:
                server.start()
            assert exited.value.port_taken
        assert server.port == port
        server.start()
        assert server.port == port and server.ping()
    finally:
        server.cleanup()


def test_cluster_ports_never_collide_with_each_other_or_a_bus_port() -> None:
    """Node ports and bus ports come from disjoint ranges below the kernel's ephemeral range."""
    picked: set[int] = set()
    ports = [free_cluster_port(picked) for _ in range(50)]
    assert len(set(ports)) == 50 and picked == set(ports)
    assert max(ports) < min(ports) + 10000, "a node port is another node's bus port"
    if _ephemeral_ports_start() > 21000:
        assert max(ports) + 10000 < _ephemeral_ports_start()


def test_a_service_whose_port_was_taken_starts_on_another(
    taken_port: int, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([taken_port])
    monkeypatch.setattr(support, "free_port", lambda: next(picks, None) or free_port())
    cluster = Cluster(redis_url=redis_server.url, prefix=prefix)
    try:
        router = cluster.router()
        assert router.port != taken_port and router.ready()
        assert cluster.services == [router], "the service that could not bind is stopped and forgotten"
    finally:
        cluster.stop()

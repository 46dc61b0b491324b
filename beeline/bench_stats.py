"""Measurement helpers of ``beeline bench``: /proc readings, Redis ``INFO`` deltas, percentiles, delivery
accounting and the machine description. Pure functions and frozen snapshots; nothing here starts a process.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_KB: Final = (os.sysconf("SC_PAGE_SIZE") // 1024) if hasattr(os, "sysconf") else 4


# -- /proc -------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0.0 if the process is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; the fields after its closing parenthesis are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in KiB; empty if the process is gone."""
    out: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def rss_kb(pid: int) -> int:
    """Current RSS from ``/proc/<pid>/statm`` (cheaper and finer than status)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds per named process at one instant."""

    seconds: Mapping[str, float]

    @classmethod
    def take(cls, pids: Mapping[str, int]) -> CpuSnapshot:
        return cls({name: cpu_seconds(pid) for name, pid in pids.items()})

    def delta(self, later: CpuSnapshot) -> dict[str, float]:
        return {name: round(later.seconds.get(name, 0.0) - value, 3) for name, value in self.seconds.items()}


# -- Redis INFO ----------------------------------------------------------------------------------------

INFO_COMMAND: Final = ("INFO", "stats", "cpu", "commandstats")


def resp_command_bytes(args: Sequence[str]) -> int:
    """Size on the wire of a command sent as a RESP array of bulk strings (what redis-py sends)."""
    size = len(f"*{len(args)}\r\n")
    for arg in args:
        n = len(arg.encode())
        size += len(f"${n}\r\n") + n + 2
    return size


def resp_bulk_bytes(payload: bytes) -> int:
    """Size on the wire of a RESP2 bulk string reply (INFO answers with one)."""
    return len(f"${len(payload)}\r\n") + len(payload) + 2


def parse_info(text: str) -> dict[str, str]:
    """``INFO`` text -> flat ``field -> value`` (section headers dropped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def command_calls(info: Mapping[str, str]) -> dict[str, int]:
    """``cmdstat_<name>:calls=N,...`` -> {name: N}."""
    calls: dict[str, int] = {}
    for key, value in info.items():
        if not key.startswith("cmdstat_"):
            continue
        for part in value.split(","):
            name, _, number = part.partition("=")
            if name == "calls":
                calls[key.removeprefix("cmdstat_")] = int(number)
    return calls


@dataclass(frozen=True, slots=True)
class RedisSnapshot:
    """The counters the bench reads from one ``INFO stats cpu commandstats`` call, and that call's cost.

    The call itself is traffic: its request is counted in the next snapshot's input bytes and commands,
    its reply in the next snapshot's output bytes. ``delta`` removes exactly that.
    """

    net_in: int
    net_out: int
    commands: int
    cpu_s: float
    calls: Mapping[str, int]
    own_request_bytes: int
    own_reply_bytes: int

    @classmethod
    def from_reply(cls, reply: bytes) -> RedisSnapshot:
        info = parse_info(reply.decode(errors="replace"))
        return cls(
            net_in=int(info.get("total_net_input_bytes", 0)),
            net_out=int(info.get("total_net_output_bytes", 0)),
            commands=int(info.get("total_commands_processed", 0)),
            cpu_s=float(info.get("used_cpu_sys", 0.0)) + float(info.get("used_cpu_user", 0.0)),
            calls=command_calls(info),
            own_request_bytes=resp_command_bytes(INFO_COMMAND),
            own_reply_bytes=resp_bulk_bytes(reply),
        )

    def delta(self, later: RedisSnapshot) -> RedisDelta:
        """What happened between two snapshots, less the first snapshot's own INFO call."""
        calls = {
            name: later.calls.get(name, 0) - self.calls.get(name, 0)
            for name in later.calls
            if later.calls.get(name, 0) != self.calls.get(name, 0)
        }
        if "info" in calls:
            calls["info"] -= 1
            if calls["info"] == 0:
                del calls["info"]
        return RedisDelta(
            bytes_in=later.net_in - self.net_in - later.own_request_bytes,
            bytes_out=later.net_out - self.net_out - self.own_reply_bytes,
            commands=later.commands - self.commands - 1,
            cpu_s=round(later.cpu_s - self.cpu_s, 3),
            calls=dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        )


@dataclass(frozen=True, slots=True)
class RedisDelta:
    bytes_in: int
    bytes_out: int
    commands: int  # includes commands run inside Lua scripts (Redis counts them)
    cpu_s: float
    calls: Mapping[str, int]


# -- statistics ----------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float | None]:
    values = sorted(latencies_ms)
    out: dict[str, float | None] = {}
    for name, pct in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0)):
        value = percentile(values, pct)
        out[name] = round(value, 2) if value is not None else None
    out["max"] = round(values[-1], 2) if values else None
    out["mean"] = round(sum(values) / len(values), 2) if values else None
    return out


@dataclass(frozen=True, slots=True)
class Receipt:
    """One message frame a receiver got: payload id, receiver index, seq, end-to-end latency in ms."""

    msg_id: int
    user: int
    seq: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class DeliveryCount:
    expected: int  # (message, receiver) pairs the router accepted
    delivered: int  # distinct expected pairs received
    lost: int  # accepted, never received before the deadline
    duplicated: int  # repeated (message, receiver) pairs plus repeated (receiver, seq)
    misrouted: int  # received by a user it was not sent to
    latencies_ms: tuple[float, ...]  # first receipt of each delivered pair


def count_deliveries(expected: Mapping[int, Sequence[int]], receipts: Iterable[Receipt]) -> DeliveryCount:
    """Delivered, lost and duplicated, by (message id, receiver) and by (receiver, seq)."""
    wanted = {(msg_id, user) for msg_id, users in expected.items() for user in users}
    seen_pairs: set[tuple[int, int]] = set()
    seen_seqs: set[tuple[int, int]] = set()
    duplicated = 0
    misrouted = 0
    latencies: list[float] = []
    for r in receipts:
        pair = (r.msg_id, r.user)
        seq_key = (r.user, r.seq)
        if pair in seen_pairs or seq_key in seen_seqs:
            duplicated += 1
            continue
        seen_pairs.add(pair)
        seen_seqs.add(seq_key)
        if pair not in wanted:
            misrouted += 1
            continue
        latencies.append(r.latency_ms)
    delivered = len(latencies)
    return DeliveryCount(
        expected=len(wanted),
        delivered=delivered,
        lost=len(wanted) - delivered,
        duplicated=duplicated,
        misrouted=misrouted,
        latencies_ms=tuple(latencies),
    )


# -- the machine -------------------------------------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(module)
    except PackageNotFoundError:
        return ""


def git_commit(root: Path) -> str:
    """Short commit of the checkout being measured, ``+dirty`` when tracked files differ from it.

    The benchmark's own outputs (``bench/results/``, ``docs/``) are left out: ``bench/run_matrix.py``
    rewrites them as it goes, and they say nothing about the code being measured.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], check=False, capture_output=True, text=True, timeout=5
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results", ":(exclude)docs"
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}{'+dirty' if dirty else ''}" if commit else ""


def machine_info(redis_version: str = "") -> dict[str, Any]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "memory_gib": round(int(mem_kb[0]) / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "aiohttp": _version("aiohttp"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "beeline": _version("beeline"),
        "commit": git_commit(Path(__file__).resolve().parent.parent),
    }


def other_busy_processes(own_pids: Iterable[int], min_cpu_pct: float = 20.0, sample_s: float = 0.5) -> list[str]:
    """Processes not started by the bench that used more than ``min_cpu_pct`` of a core over ``sample_s``
    (to say in the report whether the machine was quiet)."""
    import time  # noqa: PLC0415

    skip = set(own_pids) | {os.getpid()}
    before = {int(p.name): cpu_seconds(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    time.sleep(sample_s)
    busy = []
    for pid, start in before.items():
        if pid in skip:
            continue
        used = cpu_seconds(pid) - start
        if used / sample_s * 100 >= min_cpu_pct:
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            busy.append(f"{pid} {used / sample_s * 100:.0f}% {name[:80].strip()}")
    return busy

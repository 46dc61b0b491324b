#!/usr/bin/env python3
"""Runs the benchmark matrix behind docs/benchmarks.md and renders its plots and tables.

    .venv/bin/python bench/run_matrix.py                  # everything (half an hour to an hour on 2 cores)
    .venv/bin/python bench/run_matrix.py --steps plots    # re-render plots/tables from bench/results/*.json

Steps (each writes bench/results/<step>.json with ``beeline bench --json``):

matrix   N = 1, 2, 4, 8, routed and broadcast, the reference workload (400 users, 10,000 messages of
         95 bytes, one HTTP request per message) offered at 1,000 msg/s
matrix500  the same at 500 msg/s, where no configuration is near saturation
sweep    N = 4, both modes, offered 250 to 10,000 msg/s (latency vs offered rate)
max      N = 4, both modes, as fast as 64 requests in flight go (single and batch forms)
multi    N = 4, both modes, as fast as it goes, one message to 50 receivers per request
sustain  N = 4, both modes: the highest offered rate whose p99 stays under 50 ms with every message
         delivered and the offered rate achieved, in single, batch (50 per request) and multi (one
         message to 50 receivers per request; rates are deliveries/s) forms
placement  N = 4, both modes, 1,000 msg/s, with the OS placing every process and with the router alone on
         a CPU of its own (``--placement router-own-cpu``), alternating, three times each
peer     the Socket.IO peer of the reference table (``--mode socketio``: Node socket.io with
         @socket.io/redis-adapter) beside Beeline on the same machine and hour: N = 4 at 1,000 msg/s,
         routed, broadcast and socketio alternating three times, then routed and socketio six times more;
         socketio's Redis bytes at N = 1, 4, 8;
         routed and socketio flat out, alternating twice; and the single-form sustained-rate search for
         routed and socketio (needs Node.js and
         ``npm ci`` in bench/peers/socketio, which scripts/setup.sh does)
idle     10,000 idle connections on one gateway
plots    docs/bench_*.png and bench/results/tables.md

Before each step it waits (up to --quiet-wait seconds before the first, --quiet-wait-next before the
others) until the machine looks quiet: under --max-busy of its CPU busy over 2 s and no other pytest /
beeline process running. Whether it was quiet is recorded
in bench/results/conditions.json, and docs/benchmarks.md says so.

Needs matplotlib for the plots (``.venv/bin/pip install matplotlib``); Beeline itself does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
STEPS: Final = ("matrix", "matrix500", "sweep", "max", "multi", "sustain", "placement", "peer", "idle", "plots")
PLACEMENT_REPEATS: Final = 3
PEER_REPEATS: Final = 3
PEER_PAIRS: Final = 6
P99_BOUND_MS: Final = 50.0

# The reference figures for other systems (Redis bytes out per message at N = 1, 4, 8).
REFERENCE_BYTES_OUT: Final = MappingProxyType(
    {
        "python-socketio": {1: 331, 4: 1309, 8: 2614},
        "socket.io redis-adapter": {1: 203, 4: 801, 8: 1598},
        "socket.io redis-streams-adapter": {1: 337, 4: 1283, 8: 2543},
        "Django Channels": {1: 648, 4: 648, 8: 648},
    }
)
SUSTAIN_RATES: Final = MappingProxyType(
    {
        "single": (*range(500, 4001, 500), 5000, 6000, 8000, 10000, 11000, 12000, 14000, 15000, 16000),
        "batch": (4000, 6000, 8000, 10000, 12000, 14000, 16000, 18000, 20000, 25000, 30000, 35000),
        "multi": (5000, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 35000, 40000, 45000),
    }
)


def log(text: str) -> None:
    print(f"run_matrix: {text}", file=sys.stderr, flush=True)


def busy_processes() -> list[str]:
    """Other test or benchmark processes on the machine (not this script and its children)."""
    mine = {os.getpid(), os.getppid()}
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args"], capture_output=True, text=True, check=False).stdout
    busy = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) in mine or int(parts[1]) in mine:
            continue
        args = parts[3]
        if ("pytest" in args or "beeline" in args or "-m gateway" in args or "-m router" in args) and float(
            parts[2]
        ) > 1.0:
            busy.append(f"{parts[0]} {parts[2]}% {args[:100]}")
    return busy


def cpu_busy(sample_s: float = 2.0) -> float:
    """Fraction of the whole machine's CPU time that was not idle over ``sample_s`` (/proc/stat)."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = read()
    time.sleep(sample_s)
    total1, idle1 = read()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_busy: float, wait_s: float) -> dict[str, Any]:
    """Polls every 30 s until the machine is quiet (under ``max_busy`` of its CPU busy, no other test or
    benchmark process running) or ``wait_s`` passed; returns what it saw."""
    deadline = time.monotonic() + wait_s
    while True:
        busy_fraction = cpu_busy()
        others = busy_processes()
        quiet = busy_fraction < max_busy and not others
        seen = {
            "quiet": quiet,
            "cpu_busy_pct": round(busy_fraction * 100, 1),
            "load1": round(os.getloadavg()[0], 2),
            "other_processes": others,
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if quiet or time.monotonic() >= deadline:
            return seen
        log(f"machine busy ({seen['cpu_busy_pct']}% CPU, {len(others)} other test processes); waiting")
        time.sleep(30)


def bench(args: Sequence[str], out: Path) -> dict[str, Any]:
    """Runs ``beeline bench`` with ``args`` and returns its JSON report (also kept at ``out``)."""
    command = [sys.executable, "-m", "beeline.cli", "bench", *args, "--json", str(out), "--check-quiet"]
    log(" ".join(command[2:]))
    proc = subprocess.run(command, cwd=ROOT, check=False)
    if proc.returncode not in (0, 3):  # 3: it ran, but some run lost messages: the report says which
        raise SystemExit(f"beeline bench failed ({proc.returncode}): {' '.join(args)}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def bench_part(args: Sequence[str], part: Path) -> dict[str, Any]:
    """:func:`bench` for one part of a step's report: its file is removed once read (:func:`merge`
    writes the step's)."""
    report = bench(args, part)
    part.unlink()
    return report


def merge(reports: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    merged = dict(reports[0])
    merged["runs"] = [run for report in reports for run in report.get("runs", [])]
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def sustained(run: dict[str, Any]) -> bool:
    p99 = run["latency_ms"]["p99"]
    achieved = run["achieved_rate"] or 0.0
    return bool(run["ok"]) and p99 is not None and p99 < P99_BOUND_MS and achieved >= 0.95 * run["offered_rate"]


def step_sustain(
    common: list[str],
    batch_messages: int,
    results: Path,
    *,
    forms: Sequence[str] = ("single", "batch", "multi"),
    modes: Sequence[str] = ("routed", "broadcast"),
    name: str = "sustain",
) -> None:
    """Steps the offered rate up until p99 reaches 50 ms (or the rate is not achieved). On a shared 2-core
    machine one run can be unlucky, so a rate that fails is tried once more before the search stops."""
    reports = []
    for form in forms:
        for mode in modes:
            extra = ["--form", form]
            if form != "single":  # 50,000 messages: a window of a few seconds even at the higher rates
                extra += ["--batch", "50", "--concurrency", "16", "--messages", str(batch_messages)]
            for rate in SUSTAIN_RATES[form]:
                if form == "single":  # at least a 5 s window at each rate (the last --messages wins)
                    extra = ["--form", form, "--messages", str(max(10_000, 5 * rate))]
                passed = False
                for attempt in (1, 2):
                    part = results / f"{name}-{form}-{mode}-{rate}-{attempt}.json"
                    report = bench_part([*common, "--nodes", "4", "--mode", mode, *extra, "--rate", str(rate)], part)
                    run = report["runs"][0]
                    run["attempt"] = attempt
                    reports.append(report)
                    log(f"{form} {mode} {rate}/s try {attempt}: p99 {run['latency_ms']['p99']} ms")
                    if sustained(run):
                        passed = True
                        break
                if not passed:
                    break
    merge(reports, results / f"{name}.json")


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: Any, spec: str = "{:,.1f}") -> str:
    return "-" if value is None else spec.format(value)


def matrix_table(runs: Sequence[dict[str, Any]]) -> str:
    head = (
        "| mode | N | offered msg/s | achieved msg/s | delivered | lost | dup | p50 ms | p90 ms | p99 ms | max ms "
        "| Redis out B/msg | Redis in B/msg | Redis cmds/msg | router CPU s/1k | gateways CPU s/1k "
        "| server CPU ms/msg | Redis CPU s/1k | peak RSS router / gateway MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['mode']} | {r['nodes']} | {fmt(r['offered_rate'], '{:,.0f}') if r['offered_rate'] else 'max'} "
            f"| {fmt(r['achieved_rate'], '{:,.0f}')} | {r['delivered']:,}/{r['sent']:,} "
            f"| {r['lost']} | {r['duplicated']} "
            f"| {fmt(lat['p50'])} | {fmt(lat['p90'])} | {fmt(lat['p99'])} | {fmt(lat['max'], '{:,.0f}')} "
            f"| {fmt(r['redis']['bytes_out_per_msg'], '{:,.0f}')} | {fmt(r['redis']['bytes_in_per_msg'], '{:,.0f}')} "
            f"| {fmt(r['redis']['commands_per_msg'])} | {fmt(r['cpu']['router_s_per_1k'], '{:.3f}')} "
            f"| {fmt(r['cpu']['gateways_s_per_1k'], '{:.3f}')} | {fmt(r['cpu']['server_ms_per_msg'], '{:.3f}')} "
            f"| {fmt(r['redis']['cpu_s_per_1k'], '{:.3f}')} "
            f"| {fmt(r['peak_rss_mb']['router'], '{:.0f}')} / {fmt(r['peak_rss_mb']['gateway_max'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def short_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| mode | form | offered msg/s | achieved msg/s | delivered | p50 ms | p90 ms | p99 ms | max ms "
        "| server CPU ms/msg | client CPU s/1k |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lat = r["latency_ms"]
        form = r["form"] if r["form"] == "single" else f"{r['form']} x{r['batch']}"
        offered = f"{r['offered_rate']:,.0f}" if r["offered_rate"] else f"max ({r['concurrency']} in flight)"
        lines.append(
            f"| {r['mode']} | {form} | {offered} | {fmt(r['achieved_rate'], '{:,.0f}')} "
            f"| {r['delivered']:,}/{r['sent']:,} | {fmt(lat['p50'])} | {fmt(lat['p90'])} | {fmt(lat['p99'])} "
            f"| {fmt(lat['max'], '{:,.0f}')} | {fmt(r['cpu']['server_ms_per_msg'], '{:.3f}')} "
            f"| {fmt(r['cpu']['clients_s_per_1k'], '{:.3f}')} |"
        )
    return "\n".join(lines)


def sustain_summary(runs: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| form | mode | highest offered rate with p99 < 50 ms | its p99 ms | next rate: p99 ms (each try) |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["form"], r["mode"]), []).append(r)
    for (form, mode), items in groups.items():
        rates = sorted({r["offered_rate"] for r in items})
        good = [rate for rate in rates if any(sustained(r) for r in items if r["offered_rate"] == rate)]
        bad = [rate for rate in rates if rate not in good]
        best = max(good) if good else None
        best_p99 = (
            min(r["latency_ms"]["p99"] for r in items if r["offered_rate"] == best and sustained(r)) if good else None
        )
        after = "-"
        if bad:
            tries = [fmt(r["latency_ms"]["p99"]) for r in items if r["offered_rate"] == bad[0]]
            after = f"{bad[0]:,.0f}: {', '.join(tries)}"
        lines.append(f"| {form} | {mode} | {fmt(best, '{:,.0f}')} | {fmt(best_p99)} | {after} |")
    return "\n".join(lines)


def placement_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| mode | placement | p50 / p99 ms | router CPU s/1k | gateways CPU s/1k | server CPU ms/msg "
        "| Redis CPU s/1k | client CPU s/1k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["mode"] != "routed", r["placement"]["placement"])):
        lat, cpu = r["latency_ms"], r["cpu"]
        lines.append(
            f"| {r['mode']} | {r['placement']['placement']} | {fmt(lat['p50'])} / {fmt(lat['p99'])} "
            f"| {fmt(cpu['router_s_per_1k'], '{:.3f}')} | {fmt(cpu['gateways_s_per_1k'], '{:.3f}')} "
            f"| {fmt(cpu['server_ms_per_msg'], '{:.3f}')} | {fmt(r['redis']['cpu_s_per_1k'], '{:.3f}')} "
            f"| {fmt(cpu['clients_s_per_1k'], '{:.3f}')} |"
        )
    return "\n".join(lines)


STEP_TABLES: Final[dict[str, tuple[Callable[[Sequence[dict[str, Any]]], str], ...]]] = {
    "matrix": (matrix_table,),
    "matrix500": (matrix_table,),
    "sweep": (matrix_table,),
    "max": (short_table,),
    "multi": (matrix_table,),
    "sustain": (sustain_summary, short_table),
    "placement": (placement_table,),
    "peer": (placement_table,),
    "peer-pairs": (placement_table,),
    "peer-bytes": (matrix_table,),
    "peer-max": (short_table,),
    "peer-sustain": (sustain_summary, short_table),
}
"""The tables of bench/results/tables.md, in order: each report's runs through each renderer."""


def repeated(items: str, times: int) -> str:
    """A comma-separated list given ``times`` over: ``beeline bench`` runs its lists in order, so the
    items alternate and see the machine's same hours."""
    return ",".join([items] * times)


def step_placement(common: list[str], results: Path) -> None:
    """The same runs with both placements, alternating."""
    placements = repeated("shared,router-own-cpu", PLACEMENT_REPEATS)
    args = [*common, "--nodes", "4", "--mode", "both", "--rate", "1000", "--placement", placements]
    bench(args, results / "placement.json")


def step_peer(common: list[str], batch_messages: int, results: Path) -> None:
    """Beeline and the Socket.IO peer on the same machine and hour (see the module docstring)."""
    modes = repeated("routed,broadcast,socketio", PEER_REPEATS)
    bench([*common, "--nodes", "4", "--mode", modes, "--rate", "1000"], results / "peer.json")
    # Beeline and the peer alone, six more alternating pairs: the ratio of the two on a noisy machine.
    pairs = repeated("routed,socketio", PEER_PAIRS)
    bench([*common, "--nodes", "4", "--mode", pairs, "--rate", "1000"], results / "peer-pairs.json")
    bench([*common, "--nodes", "1,4,8", "--mode", "socketio", "--rate", "1000"], results / "peer-bytes.json")
    # Flat out (64 requests in flight), alternating: capacity apart from the p99 bound of the search below.
    flat_out = ["--nodes", "4", "--mode", repeated("routed,socketio", 2), "--messages", "20000"]
    bench([*common, *flat_out], results / "peer-max.json")  # the last --messages wins
    step_sustain(common, batch_messages, results, forms=("single",), modes=("routed", "socketio"), name="peer-sustain")


def step_plots(results: Path, docs: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from beeline.bench_plot import plot_cpu, plot_latency_vs_rate, plot_redis_bytes  # noqa: PLC0415

    matrix = load(results, "matrix")
    peer_bytes = load(results, "peer-bytes")
    if matrix:
        plot_redis_bytes(
            [*matrix["runs"], *(peer_bytes["runs"] if peer_bytes else [])],
            docs / "bench_redis_bytes_per_message.png",
            references=REFERENCE_BYTES_OUT,
            title="Redis bytes per delivered message vs N\n"
            "(measured: Beeline and the Socket.IO peer; grey: the issue's figures for other systems, out)",
        )
        plot_cpu(
            matrix["runs"], docs / "bench_cpu_per_message.png", title="Server CPU per message at 1,000 msg/s offered"
        )
    sweep = load(results, "sweep")
    if sweep:
        plot_latency_vs_rate(
            sweep["runs"], docs / "bench_latency_vs_rate.png", title="End-to-end latency vs offered rate, N = 4"
        )
    peer_sustain = load(results, "peer-sustain")
    if peer_sustain:
        last_try = {(r["mode"], r["offered_rate"]): r for r in peer_sustain["runs"]}  # runs are in order
        plot_latency_vs_rate(
            list(last_try.values()),
            docs / "bench_peer_latency_vs_rate.png",
            title="End-to-end latency vs offered rate, N = 4, one run: Beeline routed and the Socket.IO peer\n"
            "(single form; the last try at each rate of the sustained-rate search)",
        )
    tables = []
    for name, renderers in STEP_TABLES.items():
        report = load(results, name)
        if report:
            tables += [f"## {name}", *(render(report["runs"]) for render in renderers)]
    idle = load(results, "idle")
    if idle:
        tables += ["## idle", "```json", json.dumps(idle["idle"], indent=2), "```"]
    (results / "tables.md").write_text("\n\n".join(tables) + "\n")
    log(f"wrote {results / 'tables.md'} and {docs}/bench_*.png")


def run_step(step: str, ns: argparse.Namespace, common: list[str], results: Path) -> None:
    if step == "matrix":
        bench([*common, "--nodes", "1,2,4,8", "--mode", "both", "--rate", "1000"], results / "matrix.json")
    elif step == "matrix500":
        bench([*common, "--nodes", "1,2,4,8", "--mode", "both", "--rate", "500"], results / "matrix500.json")
    elif step == "sweep":
        rates = "250,500,1000,2000,4000,6000,8000,10000"
        bench([*common, "--nodes", "4", "--mode", "both", "--rate", rates], results / "sweep.json")
    elif step == "max":
        single = bench_part([*common, "--nodes", "4", "--mode", "both"], results / "max-single.json")
        batch_args = ["--form", "batch", "--batch", "50", "--concurrency", "16"]
        batch_args += ["--messages", str(ns.batch_messages)]  # the last --messages wins
        batch = bench_part([*common, "--nodes", "4", "--mode", "both", *batch_args], results / "max-batch.json")
        merge([single, batch], results / "max.json")
    elif step == "multi":
        multi_args = [
            "--form",
            "multi",
            "--batch",
            "50",
            "--concurrency",
            "16",
            "--messages",
            str(ns.batch_messages),
        ]
        bench([*common, "--nodes", "4", "--mode", "both", *multi_args], results / "multi.json")
    elif step == "sustain":
        step_sustain(common, ns.batch_messages, results)
    elif step == "placement":
        step_placement(common, results)
    elif step == "peer":
        step_peer(common, ns.batch_messages, results)
    elif step == "idle":
        bench(["--idle-connections", str(ns.idle_connections), "--quiet"], results / "idle.json")
    elif step == "plots":
        step_plots(results, ns.docs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument(
        "--batch-messages", type=int, default=50_000, help="messages of the batch-form runs (a window of seconds)"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the PNG plots go")
    parser.add_argument("--max-busy", type=float, default=0.15, help="machine CPU fraction that still counts as quiet")
    parser.add_argument(
        "--quiet-wait", type=float, default=1200, help="seconds to wait for quiet before the first step"
    )
    parser.add_argument("--quiet-wait-next", type=float, default=300, help="... before each later step")
    ns = parser.parse_args(argv)
    steps = [s for s in ns.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    results: Path = ns.results
    results.mkdir(parents=True, exist_ok=True)
    conditions_path = results / "conditions.json"
    conditions: dict[str, Any] = json.loads(conditions_path.read_text()) if conditions_path.exists() else {}
    common = ["--users", str(ns.users), "--messages", str(ns.messages), "--quiet"]
    waited = False
    for step in steps:
        if step != "plots":
            conditions[step] = wait_quiet(ns.max_busy, ns.quiet_wait_next if waited else ns.quiet_wait)
            waited = True
            log(f"{step}: machine {'quiet' if conditions[step]['quiet'] else 'NOT quiet'} ({conditions[step]})")
        run_step(step, ns, common, results)
        conditions_path.write_text(json.dumps(conditions, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PNG plots of ``beeline bench`` reports.

matplotlib is imported here only, and only when a plot is asked for (``beeline bench --plot DIR`` or
``bench/run_matrix.py``); it is not a runtime dependency of Beeline (``pip install matplotlib``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

MODE_COLORS: Final = MappingProxyType({"routed": "tab:blue", "broadcast": "tab:red", "socketio": "tab:green"})
REDIS_BYTES_PNG: Final = "bench_redis_bytes_per_message.png"
LATENCY_PNG: Final = "bench_latency_vs_rate.png"
CPU_PNG: Final = "bench_cpu_per_message.png"

References = Mapping[str, Mapping[int, float]]
"""name -> {N: value}: figures of other systems drawn for comparison (grey, dotted)."""


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _by_mode(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        out.setdefault(str(run["mode"]), []).append(run)
    return out


def plot_redis_bytes(
    runs: Sequence[Mapping[str, Any]], path: Path, references: References | None = None, title: str = ""
) -> Path:
    """Redis bytes per delivered message against the number of gateways, per routing mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.0), dpi=120)
    for name, series in (references or {}).items():
        xs = sorted(series)
        ax.plot(xs, [series[x] for x in xs], linestyle=":", marker=".", color="0.6", linewidth=1)
        ax.annotate(name, (xs[-1], series[xs[-1]]), fontsize=7, color="0.4", xytext=(4, 0), textcoords="offset points")
    for mode, unsorted in sorted(_by_mode(runs).items()):
        items = sorted(unsorted, key=lambda r: r["nodes"])
        xs = [r["nodes"] for r in items]
        color = MODE_COLORS.get(mode)
        ax.plot(xs, [r["redis"]["bytes_out_per_msg"] for r in items], marker="o", color=color, label=f"{mode}: out")
        ax.plot(
            xs,
            [r["redis"]["bytes_in_per_msg"] for r in items],
            marker="s",
            linestyle="--",
            color=color,
            alpha=0.7,
            label=f"{mode}: in",
        )
    nodes = sorted({int(r["nodes"]) for r in runs})
    ax.set_xticks(nodes)
    ax.set_xlabel("gateway nodes (N)")
    ax.set_ylabel("Redis bytes per delivered message")
    ax.set_title(title or "Redis traffic per message vs number of nodes", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, path)


def _spaced_labels(rates: list[float], min_ratio: float = 1.17) -> list[str]:
    """Tick labels for a log axis, blank where a rate is within ``min_ratio`` of the last one labelled."""
    labels: list[str] = []
    last = 0.0
    for rate in rates:
        keep = not last or rate >= last * min_ratio
        labels.append(f"{rate:,.0f}" if keep else "")
        last = rate if keep else last
    return labels


def plot_latency_vs_rate(runs: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """End-to-end latency percentiles against the offered rate, per routing mode (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {"p50": ":", "p90": "--", "p99": "-"}
    for mode, unsorted in sorted(_by_mode(runs).items()):
        items = sorted((r for r in unsorted if r["offered_rate"]), key=lambda r: r["offered_rate"])
        xs = [r["offered_rate"] for r in items]
        for pct, style in styles.items():
            ys = [r["latency_ms"][pct] for r in items]
            ax.plot(xs, ys, marker="o", linestyle=style, color=MODE_COLORS.get(mode), label=f"{mode} {pct}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    rates = sorted({float(r["offered_rate"]) for r in runs if r["offered_rate"]})
    ax.set_xticks(rates)
    crowded = len(rates) > 8  # the labels of neighbouring rates would overlap on the log axis
    ax.set_xticklabels(_spaced_labels(rates), rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("offered rate (messages/s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.axhline(50, color="0.5", linewidth=0.8, linestyle="-.")
    ax.annotate(  # at the right end: the legend sits top left
        "50 ms",
        (rates[-1] if rates else 1, 50),
        fontsize=7,
        color="0.4",
        xytext=(-2, 2),
        textcoords="offset points",
        ha="right",
    )
    ax.set_title(title or "Latency percentiles vs offered rate", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    return _save(plt, fig, path)


def plot_cpu(runs: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Server CPU per message (router and gateways stacked) against N, one bar per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    nodes = sorted({int(r["nodes"]) for r in runs})
    width = 0.38
    for offset, mode in ((-width / 2, "routed"), (width / 2, "broadcast")):
        items = {int(r["nodes"]): r for r in runs if r["mode"] == mode}
        if not items:
            continue
        xs = [i + offset for i, n in enumerate(nodes) if n in items]
        router = [items[n]["cpu"]["router_s_per_1k"] for n in nodes if n in items]
        gateways = [items[n]["cpu"]["gateways_s_per_1k"] for n in nodes if n in items]
        color = MODE_COLORS[mode]
        ax.bar(xs, router, width, color=color, alpha=0.9, label=f"{mode}: router")
        ax.bar(xs, gateways, width, bottom=router, color=color, alpha=0.45, label=f"{mode}: gateways")
    ax.set_xticks(range(len(nodes)))
    ax.set_xticklabels([str(n) for n in nodes])
    ax.set_xlabel("gateway nodes (N)")
    ax.set_ylabel("server CPU ms per message (= s per 1,000)")
    ax.set_title(title or "Router + gateway CPU per message", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """The plots a report supports: by N when it has several node counts, by rate when several rates."""
    runs = list(report.get("runs", ()))
    written: list[Path] = []
    if len({r["nodes"] for r in runs}) > 1:
        written.append(plot_redis_bytes(runs, out_dir / REDIS_BYTES_PNG))
        written.append(plot_cpu(runs, out_dir / CPU_PNG))
    if len({r["offered_rate"] for r in runs if r["offered_rate"]}) > 1:
        written.append(plot_latency_vs_rate(runs, out_dir / LATENCY_PNG))
    return written

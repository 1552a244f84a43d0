"""Aggregating cells into the table (median with min-max over repeats) and the charts."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.measure import CellResult

# (field, heading, format, higher is better)
METRICS: list[tuple[str, str, str, bool]] = [
    ("accepted_per_s", "accepted msg/s", "{:.0f}", True),
    ("e2e_per_s", "end-to-end msg/s", "{:.0f}", True),
    ("accept_p50_ms", "accept p50 ms", "{:.1f}", False),
    ("accept_p99_ms", "accept p99 ms", "{:.1f}", False),
    ("e2e_p50_ms", "e2e p50 ms", "{:.1f}", False),
    ("e2e_p99_ms", "e2e p99 ms", "{:.1f}", False),
    ("cpu_ms_per_msg", "CPU ms/msg", "{:.2f}", False),
    ("peak_pss_mb", "peak PSS MB", "{:.0f}", False),
]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float


def spread(values: Iterable[float]) -> Spread:
    found = list(values)
    if not found:
        return Spread(0.0, 0.0, 0.0)
    return Spread(statistics.median(found), min(found), max(found))


Key = tuple[str, int, int]  # system, size, sessions


def group(cells: list[CellResult]) -> dict[Key, list[CellResult]]:
    groups: dict[Key, list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.system, cell.size, cell.sessions), []).append(cell)
    return groups


def metric(cells: list[CellResult], name: str) -> Spread:
    return spread(float(getattr(cell, name)) for cell in cells)


def size_label(size: int) -> str:
    return f"{size // 1024} KB" if size >= 1024 else f"{size} B"


def _fmt(fmt: str, value: Spread, with_range: bool) -> str:
    text = fmt.format(value.median)
    if with_range and value.low != value.high:
        text += f" ({fmt.format(value.low)}-{fmt.format(value.high)})"
    return text


def _ratio(kurrier: Spread, postfix: Spread) -> str:
    if postfix.median == 0:
        return "-"
    return f"{kurrier.median / postfix.median:.2f}x"


# The peers kurrier is measured against, in the order their rows are shown.
PEERS = {"postfix": "Postfix", "haraka": "Haraka"}


def systems_of(cells: list[CellResult]) -> list[str]:
    """The systems in the order first run, the peers (the references) last."""
    seen = list(dict.fromkeys(c.system for c in cells))
    return [s for s in seen if s not in PEERS] + [p for p in PEERS if p in seen]


def comparisons(systems: list[str]) -> list[tuple[str, str, str]]:
    """(system, reference, label): each kurrier against each peer, variants against kurrier."""
    pairs = []
    for system in systems:
        if system in PEERS:
            continue
        pairs += [(system, peer, f"{system}/{PEERS[peer]}") for peer in PEERS if peer in systems]
        if system != "kurrier" and "kurrier" in systems:
            pairs.append((system, "kurrier", f"{system}/kurrier"))
    return pairs


def markdown_table(cells: list[CellResult]) -> str:
    """One row per system and cell, then the ratios of the medians (kurrier/Postfix ...)."""
    groups = group(cells)
    sizes = sorted({c.size for c in cells})
    sessions = sorted({c.sessions for c in cells})
    systems = systems_of(cells)
    headings = ["size", "sessions", "system", "a 250 survives", *(m[1] for m in METRICS)]
    headings += ["lost", "dup"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for size in sizes:
        for count in sessions:
            spreads: dict[str, dict[str, Spread]] = {}
            for system in systems:
                found = groups.get((system, size, count), [])
                if not found:
                    continue
                spreads[system] = {m[0]: metric(found, m[0]) for m in METRICS}
                row = [size_label(size), str(count), system, found[0].durability]
                row += [_fmt(m[2], spreads[system][m[0]], len(found) > 1) for m in METRICS]
                row += [str(sum(c.lost for c in found)), str(sum(c.duplicates for c in found))]
                lines.append("| " + " | ".join(row) + " |")
            for system, reference, label in comparisons(systems):
                if system not in spreads or reference not in spreads:
                    continue
                row = [size_label(size), str(count), f"**{label}**", ""]
                row += [
                    f"**{_ratio(spreads[system][m[0]], spreads[reference][m[0]])}**"
                    for m in METRICS
                ]
                row += ["", ""]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cpu_breakdown_table(cells: list[CellResult]) -> str:
    """CPU ms per delivered message by process role (median over repeats)."""
    groups = group(cells)
    lines = []
    for (system, size, count), found in sorted(groups.items()):
        roles: dict[str, list[float]] = {}
        for cell in found:
            for name, seconds in cell.cpu_by_process.items():
                roles.setdefault(name, []).append(seconds * 1000 / max(1, cell.delivered))
        parts = sorted(((statistics.median(v), name) for name, v in roles.items()), reverse=True)
        shown = ", ".join(f"{name} {value:.2f}" for value, name in parts if abs(value) >= 0.01)
        lines.append(f"- {system}, {size_label(size)}, {count} sessions: {shown}")
    return "\n".join(lines)


def charts(cells: list[CellResult], out: Path) -> list[Path]:
    """throughput.png, latency.png and cost.png in out; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(cells)
    sizes = sorted({c.size for c in cells})
    sessions = sorted({c.sessions for c in cells})
    systems = systems_of(cells)
    palette = ["#2a7ab0", "#59a14f", "#b07aa1", "#76b7b2", "#9c755f"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(systems)}
    colours["postfix"] = "#d9822b"
    colours["haraka"] = "#e15759"
    written: list[Path] = []

    def bars(
        axis: object,
        size: int,
        fields: list[tuple[str, str]],
        ylabel: str,
        log: bool = False,
    ) -> None:
        from matplotlib.axes import Axes

        assert isinstance(axis, Axes)
        slots = len(systems) * len(fields)
        width = 0.8 / slots
        positions = range(len(sessions))
        slot = 0
        for field_name, field_label in fields:
            for system in systems:
                values = [metric(groups.get((system, size, n), []), field_name) for n in sessions]
                offsets = [p - 0.4 + width * (slot + 0.5) for p in positions]
                alpha = 1.0 if fields.index((field_name, field_label)) == 0 else 0.55
                axis.bar(
                    offsets,
                    [v.median for v in values],
                    width,
                    yerr=[
                        [v.median - v.low for v in values],
                        [v.high - v.median for v in values],
                    ],
                    capsize=2,
                    color=colours[system],
                    alpha=alpha,
                    label=f"{system} {field_label}".strip(),
                    hatch="" if alpha == 1.0 else "//",
                )
                slot += 1
        axis.set_xticks(list(positions), [f"{n} sessions" for n in sessions])
        axis.set_title(size_label(size))
        axis.set_ylabel(ylabel)
        if log:
            axis.set_yscale("log")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)

    def figure(name: str, rows: list[tuple[list[tuple[str, str]], str, bool]], title: str) -> None:
        fig, axes = plt.subplots(
            len(rows), len(sizes), figsize=(5.2 * len(sizes), 3.4 * len(rows)), squeeze=False
        )
        for r, (fields, ylabel, log) in enumerate(rows):
            for c, size in enumerate(sizes):
                bars(axes[r][c], size, fields, ylabel, log)
        fig.suptitle(title)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    figure(
        "throughput.png",
        [([("e2e_per_s", "end-to-end"), ("accepted_per_s", "accepted")], "messages/s", False)],
        "Throughput (median, min-max over repeats)",
    )
    figure(
        "latency.png",
        [
            ([("accept_p50_ms", "p50"), ("accept_p99_ms", "p99")], "acceptance ms", True),
            ([("e2e_p50_ms", "p50"), ("e2e_p99_ms", "p99")], "end-to-end ms", True),
        ],
        "Latency percentiles (log scale)",
    )
    figure(
        "cost.png",
        [
            ([("cpu_ms_per_msg", "")], "CPU ms per message", False),
            ([("peak_pss_mb", "")], "peak memory (PSS) MB", False),
        ],
        "Cost: CPU per message and peak memory",
    )
    return written


def shutdown_line(cells: list[CellResult]) -> str:
    """How each system took its stop after its cells (a drain that hangs is a finding too)."""
    parts = []
    for system in sorted({c.system for c in cells}):
        found = [c for c in cells if c.system == system]
        clean = [c for c in found if c.stopped_cleanly]
        times = spread(c.stop_s for c in found)
        parts.append(
            f"{system} exited cleanly when stopped in {len(clean)} of {len(found)} cells "
            f"(median {times.median:.1f} s, max {times.high:.1f} s)"
        )
    return "Shutdown: " + "; ".join(parts) + "."


def summary(cells: list[CellResult], header: Callable[[], str]) -> str:
    return "\n\n".join(
        [
            header(),
            markdown_table(cells),
            "CPU ms per message by process:",
            cpu_breakdown_table(cells),
            shutdown_line(cells),
        ]
    )

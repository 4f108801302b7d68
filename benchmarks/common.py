"""Shared pieces of the benchmark scripts: timing on a noisy machine, and the results file.

Import this module before torch: it sets OMP_WAIT_POLICY=PASSIVE, without which torch's OpenMP
threads spin while the other core is busy and element-wise ops run many times slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT))  # so that scripts run from anywhere import this checkout


def command_line() -> str:
    """The exact command that is running, as a user would type it from the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def interleaved(
    variants: dict[str, Callable[[], None]], rounds: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call of each variant, per round; variants alternate within every round.

    Alternating, rather than timing each variant in one block, lets a burst of load from
    elsewhere hit every variant alike, so that per-round ratios stay meaningful.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(repeat):
                variants[name]()
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def interleaved_clocks(
    variants: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``interleaved`` with one call a round, timed on two clocks: wall and CPU seconds.

    CPU time (``time.process_time``: this process, all its threads) counts the work done and
    not the waiting for a core; with OMP_WAIT_POLICY=PASSIVE idle threads sleep rather than
    spin, so they add nothing to it. Where wall-clock and CPU-time ratios agree, load from
    elsewhere hit every variant alike.
    """
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w, c = time.perf_counter(), time.process_time()
            variants[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return wall, cpu


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of num/den: robust to rounds that load from elsewhere slowed."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux: clear_refs 5) and return the current RSS in MiB.

    Importing torch alone peaks higher than a small model's training does, so a peak taken
    without this reset measures the imports.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak RSS since the last ``reset_peak_rss``, in MiB."""
    return _status_mib("VmHWM")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the section ``## title`` of docs/benchmarks.md, leaving the rest.

    The section is stamped with ``command`` (default: the running command line), the date
    and the machine.
    """
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmarks\n\nEvery table below was produced by the command above it; ratios are "
        "medians of per-round ratios measured in one run, with the variants interleaved.\n"
    )
    stamp = datetime.date.today().isoformat()
    section = (f"## {title}\n\nCommand: `{command or command_line()}`  \nDate: {stamp}  \n"
               f"Machine: {machine()}\n\n{body.strip()}\n")
    head = f"## {title}\n"
    if head in text:
        before, rest = text.split(head, 1)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)

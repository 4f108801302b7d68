"""The README's run times for `adapterkit finetune` are measurements with their conditions."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DURATION = re.compile(r"\b\d+ min \d+ s\b")


def time_table() -> list[dict[str, str]]:
    """The rows of the *Time* table in docs/cli.md, keyed by its header."""
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text[text.index("**Time.**"):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    end = next((i for i, line in enumerate(lines[2:], 2)
                if len(line.strip("|").split("|")) != len(header)), len(lines))
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:end]]


def test_every_time_has_its_machine_load_and_openmp_policy() -> None:
    rows = time_table()
    assert rows and {"command", "wall time", "load average", "OpenMP"} <= set(rows[0])
    for row in rows:
        assert DURATION.search(row["wall time"]), row
        assert row["load average"] and row["OpenMP"], row


def test_the_readme_quotes_only_times_from_that_table() -> None:
    readme = (ROOT / "README.md").read_text()
    main_job = readme[readme.index("## Main job"):readme.index("## Documentation")]
    quoted = DURATION.findall(main_job)
    assert quoted, "the README gives the main job's time"
    measured = {m for row in time_table() for m in DURATION.findall(row["wall time"])}
    assert set(quoted) <= measured, set(quoted) - measured
    assert "about two minutes" not in main_job  # a figure without its conditions
    assert "load average" in main_job and "OMP_WAIT_POLICY" in main_job

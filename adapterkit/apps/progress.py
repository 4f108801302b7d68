"""Progress on stderr for the command line: tqdm's bars on a terminal; for ``finetune``,
where no bar shows (a file, a pipe: CI, nohup), a plain line at each evaluation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from .workflow import NoBar


def progress_tools(enabled: bool | None) -> tuple[Callable[[int, str], Any],
                                                   Callable[[Iterable[Any], str], Iterable[Any]]]:
    """A bar factory ``bar(total, desc)`` and an iterable wrapper, tqdm's if installed.

    ``enabled=None``: bars only when stderr is a terminal (tqdm's own rule).
    """
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if enabled is False or tqdm is None:
        return (lambda total, desc: NoBar()), (lambda it, desc: it)
    disable = None if enabled is None else False
    return (
        lambda total, desc: tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                                 dynamic_ncols=True, mininterval=0.5, disable=disable),
        lambda it, desc: tqdm(it, desc=desc, file=sys.stderr, leave=False, mininterval=0.5,
                              disable=disable),
    )


def bars_show(enabled: bool | None) -> bool:
    """Whether ``progress_tools(enabled)`` draws bars: tqdm is there, and they are asked
    for or stderr is a terminal (tqdm's own rule)."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return enabled is True or (enabled is None and sys.stderr.isatty())


def progress_line(line: str) -> None:
    """A progress line on stderr where no bar shows (CI, nohup, a pipe): flushed, after what
    stdout holds, so that a log that takes both (2>&1) has them in order."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def finetune_progress(enabled: bool | None) -> tuple[Callable[[int, str], Any],
                                                      Callable[[str], None] | None]:
    """``finetune``'s bars, and its progress lines where bars do not show (not with
    ``--no-progress``)."""
    bar = progress_tools(enabled)[0]
    return bar, None if enabled is False or bars_show(enabled) else progress_line

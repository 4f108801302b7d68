"""Reports: parameter counts per adapter set and per top-level module, as printable tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .tree import adapted_modules


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "0.00%"


@dataclass(frozen=True)
class Summary:
    """Trainable and total parameter counts; ``str()`` is the table, ending in the seed's lines.

    ``rows`` holds ``(group, trainable, total)``: one per adapter set (``adapters[NAME]``),
    then one per top-level module (adapters included in the module that holds them).
    """

    trainable: int
    total: int
    rows: tuple[tuple[str, int, int], ...] = field(default=())

    def __str__(self) -> str:
        table = format_table(
            ["group", "trainable", "total", "trainable %"],
            [(g, f"{t:,}", f"{n:,}", percent(t, n)) for g, t, n in self.rows],
        )
        return (
            f"{table}\n"
            f"Trainable params: {self.trainable} ({percent(self.trainable, self.total)})\n"
            f"Total params: {self.total}"
        )


def _count(params: list[nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module) -> Summary:
    """Count trainable and total parameters, per adapter set and per top-level module.

    Example:
        >>> import adapterkit
        >>> from adapterkit.models.gpt import GPT
        >>> model = GPT(vocab_size=64, d_model=32, max_length=16, num_heads=4, dff=64,
        ...             dropout=0.1, N=2)
        >>> _ = adapterkit.inject(model, ["mha_block", "ffn_block"],
        ...                       adapterkit.AdapterConfig(bottleneck=8))
        >>> _ = adapterkit.freeze(model, train=["adapters"])
        >>> s = adapterkit.summary(model)
        >>> s.trainable == 4 * (2 * 32 * 8 + 8 + 32)
        True
        >>> str(s).splitlines()[-2]
        'Trainable params: 2208 (9.21%)'
    """
    rows: list[tuple[str, int, int]] = []
    by_set: dict[str, list[nn.Parameter]] = {}
    for _, _, slot in adapted_modules(model):
        for set_name, adapter in slot.items():
            by_set.setdefault(set_name, []).extend(adapter.parameters())
    rows += [(f"adapters[{name}]", *_count(params)) for name, params in by_set.items()]

    seen: set[int] = set()  # a tied parameter counts once, in the first group that holds it
    groups = [("(root)", list(model.parameters(recurse=False)))]
    groups += [(name, list(child.parameters())) for name, child in model.named_children()]
    for group, params in groups:
        unique = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in unique)
        if unique:
            rows.append((group, *_count(unique)))
    trainable, total = _count(list(model.parameters()))
    return Summary(trainable=trainable, total=total, rows=tuple(rows))

"""The selection grammar: turning targets into qualified module names.

One grammar serves every entry point (``inject``, ``freeze``, ``plan``):

==========================  ===========================================================
selector                    selects
==========================  ===========================================================
``"mha_block"``             a module named exactly so, or whose name ends ``.mha_block``
``"decoder_blocks.*.ffn"``  a glob on the whole name; ``*`` stays inside one component
``"**.mha_block"``          ``**`` spans zero or more whole components
``"re:.*\\.(q|v)_proj"``     a regular expression, full match on the qualified name
``nn.Linear``               every module that is an instance of the class
``fn(name, module)``        every module for which the callable returns True
==========================  ===========================================================

A selector that selects nothing is an error naming the closest module names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from torch import nn

Selector = str | type | Callable[[str, nn.Module], bool]
Targets = Selector | Sequence[Selector]

_GLOB_CHARS = frozenset("*?[")


@lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # Matched against "." + name, so that every component, the first too, starts with a dot
    # and "**" can stand for zero or more whole components.
    pieces = [
        r"(?:\.[^.]+)*" if part == "**" else r"\." + _component_regex(part)
        for part in pattern.split(".")
    ]
    return re.compile("".join(pieces))


def _component_regex(part: str) -> str:
    pieces: list[str] = []
    i = 0
    while i < len(part):
        ch = part[i]
        if ch == "*":
            pieces.append(r"[^.]*")
        elif ch == "?":
            pieces.append(r"[^.]")
        elif ch == "[":
            end = part.find("]", i + 1)
            if end == -1:
                raise ValueError(f"invalid glob {part!r}: '[' without a closing ']'")
            body = part[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            pieces.append(f"[{body}]")
            i = end
        else:
            pieces.append(re.escape(ch))
        i += 1
    return "".join(pieces)


def compile_selector(selector: object) -> Callable[[str, nn.Module], bool]:
    """Turn one selector into a predicate ``(qualified_name, module) -> bool``.

    Raises:
        TypeError: the selector is not a str, a module class or a callable.
        ValueError: an invalid regular expression or glob.

    Example:
        >>> match = compile_selector("**.mha_block")
        >>> match("decoder_blocks.3.mha_block", None), match("mha_block_x", None)
        (True, False)
    """
    if isinstance(selector, str):
        if not selector:
            raise ValueError("an empty string is not a selector; name a module, e.g. 'mha_block'")
        if selector.startswith("re:"):
            try:
                regex = re.compile(selector[3:])
            except re.error as err:
                raise ValueError(f"invalid regular expression in {selector!r}: {err}") from None
            return lambda name, _m: regex.fullmatch(name) is not None
        if _GLOB_CHARS & set(selector):
            glob = _glob_regex(selector)
            return lambda name, _m: glob.fullmatch("." + name) is not None
        suffix = "." + selector
        return lambda name, _m: name == selector or name.endswith(suffix)
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise TypeError(f"a class selector must be an nn.Module subclass, got {selector!r}")
        return lambda _name, module: isinstance(module, selector)
    if callable(selector):
        return lambda name, module: bool(selector(name, module))
    raise TypeError(
        f"a selector is a str (name, glob or 're:' regex), an nn.Module class or a callable "
        f"(name, module) -> bool; got {type(selector).__name__}: {selector!r}"
    )


def as_selector_list(targets: object) -> list[object]:
    """A single selector or a list of them, as a list (never empty)."""
    if isinstance(targets, (str, type)) or callable(targets):
        return [targets]
    if isinstance(targets, Iterable):
        items = list(targets)
        if not items:
            raise ValueError("targets is empty; give at least one selector, e.g. ['mha_block']")
        return items
    raise TypeError(
        f"targets must be a selector or a list of selectors, got {type(targets).__name__}"
    )


def describe(selector: object) -> str:
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, str):
        return repr(selector)
    return getattr(selector, "__name__", repr(selector))


def closest_names(selector: object, names: Sequence[str], n: int = 5) -> list[str]:
    """Module names that look like what a selector that matched nothing meant."""
    if not isinstance(selector, str) or not names:
        return list(names[:n])
    key = selector.removeprefix("re:").split(".")[-1].strip("*")
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    close_last = difflib.get_close_matches(key, list(by_last), n=n, cutoff=0.5)
    found = [full for last in close_last for full in by_last[last]]
    found += difflib.get_close_matches(selector, names, n=n, cutoff=0.5)
    unique = list(dict.fromkeys(found))
    return unique[:n] if unique else list(names[:n])


def no_match_error(selector: object, names: Sequence[str], what: str = "module") -> ValueError:
    close = ", ".join(closest_names(selector, names)) or "(the model has no named submodules)"
    return ValueError(f"no {what} matches {describe(selector)}; closest: {close}")


def select_modules(
    named: Sequence[tuple[str, nn.Module]], targets: object
) -> dict[str, nn.Module]:
    """Every module that some selector selects, in model order; each selector must select one.

    ``named`` is the candidate list, usually ``model.named_modules()`` minus adapterkit's own.
    """
    predicates = [(sel, compile_selector(sel)) for sel in as_selector_list(targets)]
    chosen: dict[str, nn.Module] = {}
    for sel, pred in predicates:
        hits = [(name, mod) for name, mod in named if pred(name, mod)]
        if not hits:
            raise no_match_error(sel, [name for name, _ in named if name])
        chosen.update(hits)
    order = {name: i for i, (name, _) in enumerate(named)}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))

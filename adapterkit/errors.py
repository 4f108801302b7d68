"""Every exception class adapterkit defines, in one place; each is exported from ``adapterkit``.

The engine raises ``ValueError`` / ``TypeError`` for bad arguments, as Python does; the classes
here name failures a user may want to catch on their own. Each subclasses the built-in error
it refines, so ``except ValueError`` still catches a bad adapter file.

>>> import adapterkit
>>> issubclass(adapterkit.AdapterFileError, ValueError)
True
"""

from __future__ import annotations


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model; the message says why."""


class LayoutError(ValueError):
    """The width or the feature axis of a module's output cannot be known."""


class UntraceableModelError(ValueError):
    """``torch.fx`` could not trace the model; the message quotes the tracer's reason."""


class UninitialisedAdapterError(RuntimeError):
    """An adapter made on the ``meta`` device whose weights were never set."""


class NoGradientError(RuntimeError):
    """A trainable adapter that this forward could never give a gradient."""


__all__ = ["AdapterFileError", "LayoutError", "NoGradientError", "UninitialisedAdapterError",
           "UntraceableModelError"]

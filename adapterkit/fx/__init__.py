"""FX mode: adapters as a ``torch.fx`` graph rewrite, for models without a module to wrap.

``trace.py`` traces the model with its module sites marked, ``sites.py`` finds and chooses the
sites a selection names, and ``graph.py`` builds the ``GraphModule`` and holds the verbs.
Importing this package makes ``inject(..., method="fx")`` available (see ``docs/fx.md``).
"""

from ..lifecycle import Method, register_method
from .graph import GraphSlot, eject_fx, inject_fx
from .sites import RESIDUAL, Calls, calls

register_method("fx", Method(inject_fx, eject_fx))

__all__ = ["RESIDUAL", "Calls", "GraphSlot", "calls", "eject_fx", "inject_fx"]

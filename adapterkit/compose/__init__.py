"""Composition: several sets at once, each with a stated exact meaning and an inverse.

``routing`` runs each example of a batch through its own sets (``routed``); ``fusion`` learns an
attention over sets (``fuse``); ``averaging`` weighs sets' outputs (``average``) or parameters
(``average_sets``); ``merging`` folds a linear set into the weights (``merge``, ``unmerge``).
See ``docs/composition.md``.
"""

from .averaging import Average, average, average_sets
from .fusion import AdapterFusion, add_fusion, fuse, fusion_layout
from .merging import Merged, merge, unmerge
from .routing import routed

__all__ = ["AdapterFusion", "Average", "Merged", "add_fusion", "average", "average_sets", "fuse",
           "fusion_layout", "merge", "routed", "unmerge"]

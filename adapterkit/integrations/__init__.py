"""Bridges to other libraries, each imported only when used.

- ``adapterkit.integrations.transformers``: ``AdapterCheckpointCallback`` for transformers'
  ``Trainer`` (needs the ``hf`` extra).
- ``adapterkit.integrations.torchao``: ``base_linears(model)``, a ``filter_fn`` for torchao's
  ``quantize_`` that leaves adapters in floating point (needs the ``quant`` extra).

The engine never imports this package. What adapterkit does to a transformers model on its own,
without importing transformers, lives in the engine: ``save_pretrained`` keeps the adapters
(``adapterkit/io/bundle.py``), and gradients reach adapters under reentrant gradient
checkpointing (``adapterkit/freezing.py``).
"""

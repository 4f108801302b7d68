"""Bridges to other libraries, each imported only when used.

- ``adapterkit.integrations.transformers``: ``AdapterCheckpointCallback`` for transformers'
  ``Trainer`` (needs the ``hf`` extra).
- ``adapterkit.integrations.torchao``: ``base_linears(model)``, a ``filter_fn`` for torchao's
  ``quantize_`` that leaves adapters in floating point (needs the ``quant`` extra).
- ``adapterkit.integrations.pretrained``: what adapterkit does to a transformers model without
  importing transformers (``save_pretrained`` keeps the adapters; gradients reach adapters
  under reentrant gradient checkpointing).
"""

"""File formats: adapterkit's own adapter folder (``adapterfile``: the files; ``checkpoint``: one
set in a model; ``includes``: the modules saved with a set), every set of a model beside its
``save_pretrained`` files (``bundle``), PEFT's LoRA folders (``peft_config``: its options and
matching rules; ``peft_names``: its module paths in a model; ``peft``: reading; ``peft_write``:
writing), and the public ``save_adapters`` / ``load_adapters`` that recognise a folder
(``folders``).
"""

from .folders import load_adapters, save_adapters

__all__ = ["load_adapters", "save_adapters"]

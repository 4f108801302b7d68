"""The command-line applications, apart from the engine: ``demo``, ``plan`` and ``finetune``.

Users of the engine never import these; ``adapterkit`` (the script) and ``python -m
adapterkit`` run ``adapterkit.apps.cli.main``.

- ``cli``: argument parsing and the ``demo`` and ``plan`` commands;
- ``workflow``, ``data``: the demo's regimes, sizes and byte-level corpora.
"""

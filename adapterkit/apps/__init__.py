"""The command-line applications, apart from the engine: ``finetune``, ``demo`` and ``plan``.

Users of the engine never import these; ``adapterkit`` (the script) and ``python -m
adapterkit`` run ``adapterkit.apps.cli.main``.

- ``cli``: argument parsing, and the ``demo`` and ``plan`` commands;
- ``finetune``: the ``finetune`` command (its flags, table, files and reload check);
- ``classify``: the classifier it trains (encoder, mean pooling, head), the regimes, the
  recipe and the training loop;
- ``textdata``: labelled CSV/JSONL files and the default task (standard-library prose);
- ``workflow``, ``data``: the demo's regimes, sizes and byte-level corpora.
"""

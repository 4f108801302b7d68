"""Reference models: the seed's GPT (``adapterkit.models.gpt``)."""

"""Stage 5, files: readers and writers (``io``), the YAML config (``config``), the streaming
merge of checkpoints on disk (``pipeline``) and the ``swudi-merge`` command (``cli``)."""

__all__: list[str] = []  # a namespace of submodules, each imported by its own path

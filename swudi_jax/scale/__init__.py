"""Stage 3, other ways to run a layer's method: rows over a device mesh (``sharding``) and
LoRA factors without dense deltas (``lora``)."""

__all__: list[str] = []  # a namespace of submodules, each imported by its own path

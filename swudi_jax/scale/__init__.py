"""Stage 3, other ways to run a layer's method: rows over a device mesh (``sharding``) and
LoRA factors without dense deltas (``lora``)."""

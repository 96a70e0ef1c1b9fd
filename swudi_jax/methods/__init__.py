"""Stage 2, the methods: one module per method, each defining one
:class:`~swudi_jax.methods.spec.MethodSpec`; :mod:`swudi_jax.methods.registry` lists them."""

__all__: list[str] = []  # a namespace of submodules, each imported by its own path

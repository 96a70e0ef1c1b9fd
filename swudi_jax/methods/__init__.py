"""Stage 2, the methods: one module per method, each defining one
:class:`~swudi_jax.methods.spec.MethodSpec`; :mod:`swudi_jax.methods.registry` lists them."""

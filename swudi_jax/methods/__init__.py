"""One module per merging method; each is a pure function of a stack of task vectors.

Importing this package registers every built-in method in :mod:`swudi_jax.registry`.
"""

from swudi_jax.methods import average, dare, engine, task_arithmetic, ties  # noqa: F401
from swudi_jax.methods import output_space, regmean  # noqa: F401

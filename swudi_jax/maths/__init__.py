"""Stage 1, the maths of one layer: pure, jit/vmap-able functions of task-vector stacks.

``filters`` (h(λ) factories and rank rules), ``spectral`` (C, D, θ0, eigh, θ_h), ``solvers``
(full / low-rank / top-K eigenpairs), ``validation`` (checks at the boundary) and ``linalg``
(precision and dtype rules). Nothing here knows of paths, files or method names.
"""

__all__: list[str] = []  # a namespace of submodules, each imported by its own path

"""Registry entries for the spectral engine: ``swudi``, ``swudi_a``, ``pinv`` and ``wudi``.

The layer functions live in :mod:`swudi_jax.methods.swudi` and :mod:`swudi_jax.methods.wudi`;
this module only names them, states their user options and checks those options before
any compute. ``wudi`` takes its optax settings as plain options (``learning_rate`` of Adam,
``steps``, ``gradient``) so that configs can set them. Its default gradient here is the Gram
form 2(θC − D): the same gradient as the reference's autodiff (tests/test_golden.py checks the
Adam-300 result of both against the authors' code) without the per-task (m, m) residuals that
make the autodiff form run out of memory on tall weights such as a 30522-row embedding.
``swudi``, ``swudi_a`` and ``pinv`` take ``solver`` (see :mod:`swudi_jax.solvers`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from swudi_jax import filters, solvers
from swudi_jax.methods.swudi import pinv_merge, swudi, swudi_a
from swudi_jax.methods.wudi import DEFAULT_LEARNING_RATE, GRADIENTS, wudi_gd
from swudi_jax.registry import MergeMethod, register
from swudi_jax.spectral import INIT_MODES
from swudi_jax.validation import check_choice, check_number

SWUDI_SOURCE = "Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging (arXiv 2606.07289)"
WUDI_SOURCE = "Cheng et al., Whoever Started the Interference Should End It, ICML 2025 (arXiv 2503.08099)"


def wudi(
    tau: jax.Array,
    *,
    steps: int = 300,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    gradient: str = "gram",
    init: str = "sum",
) -> jax.Array:
    """WUDI with Adam(``learning_rate``): :func:`swudi_jax.wudi_gd` with plain options.

    Args:
      tau: task vectors (N, m, n), maths layout.
      steps: full-batch Adam steps (300 in the reference).
      learning_rate: Adam's step size (1e-5 in the reference; betas 0.9/0.999, eps 1e-8).
      gradient: "gram" (2(θC − D), the default here) or "reference" (autodiff of the loss).
      init: starting point θ0: "sum", "mean" or "zero".
    Returns:
      The merged task vector (m, n).
    """
    optimizer = None if learning_rate == DEFAULT_LEARNING_RATE else optax.adam(learning_rate)
    return wudi_gd(tau, optimizer=optimizer, steps=steps, init=init, gradient=gradient)


def _check_init(options: Mapping[str, Any]) -> None:
    check_choice(options["init"], "init", INIT_MODES)


def _check_solver(options: Mapping[str, Any]) -> None:
    check_choice(options["solver"], "solver", solvers.SOLVERS)


def _validate_swudi(options: Mapping[str, Any]) -> None:
    check_number(options["time"], "time", low=0.0)
    check_number(options["rank_ratio"], "rank_ratio", low=0.0, high=1.0, low_open=True)
    _check_init(options)
    _check_solver(options)


def _validate_swudi_a(options: Mapping[str, Any]) -> None:
    filters.get_rank_rule(options["rank_rule"])
    check_number(options["min_rank"], "min_rank", low=1, integer=True)
    check_number(options["max_rank_ratio"], "max_rank_ratio", low=0.0, high=1.0, low_open=True)
    _check_init(options)
    _check_solver(options)


def _validate_wudi(options: Mapping[str, Any]) -> None:
    check_number(options["steps"], "steps", low=0, integer=True)
    check_number(options["learning_rate"], "learning_rate", low=0.0, low_open=True)
    check_choice(options["gradient"], "gradient", GRADIENTS)
    _check_init(options)


register(
    MergeMethod(
        name="swudi",
        fn=swudi,
        kind="spectral",
        defaults={"time": 1300.0, "rank_ratio": 0.65, "init": "sum", "solver": "auto"},
        default_scale=1.0,
        source=SWUDI_SOURCE,
        validate=_validate_swudi,
    )
)
register(
    MergeMethod(
        name="swudi_a",
        fn=swudi_a,
        kind="spectral",
        defaults={
            "rank_rule": "participation_sqrt",
            "min_rank": 1,
            "max_rank_ratio": 1.0,
            "init": "sum",
            "solver": "auto",
        },
        default_scale=1.0,
        source=SWUDI_SOURCE,
        validate=_validate_swudi_a,
    )
)
register(
    MergeMethod(
        name="pinv",
        fn=pinv_merge,
        kind="spectral",
        defaults={"solver": "auto"},
        default_scale=1.0,
        source=SWUDI_SOURCE + " (the h ≡ 1 closed form θ* = D C⁺)",
        validate=_check_solver,
    )
)
register(
    MergeMethod(
        name="wudi",
        fn=wudi,
        kind="spectral",
        defaults={"steps": 300, "learning_rate": DEFAULT_LEARNING_RATE, "gradient": "gram", "init": "sum"},
        default_scale=1.0,
        source=WUDI_SOURCE,
        validate=_validate_wudi,
    )
)

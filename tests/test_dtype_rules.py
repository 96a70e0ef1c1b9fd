"""The one compute-dtype rule and the one meaning of "floating" (maths.linalg)."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from swudi_jax.maths.linalg import compute_dtype, is_floating
from swudi_jax.methods.registry import get_method


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_every_real_float_is_floating_whatever_its_numpy_kind(dtype):
    assert is_floating(np.dtype(dtype))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_, np.complex64])
def test_integers_booleans_and_complex_are_not_floating(dtype):
    assert not is_floating(np.dtype(dtype))


def test_inputs_compute_in_float32_unless_float64():
    for dtype in (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.float32, np.int32):
        assert compute_dtype(np.dtype(dtype)) == np.float32
    assert compute_dtype(np.float32, ml_dtypes.bfloat16) == np.float32
    want64 = np.float64 if jax.config.jax_enable_x64 else np.float32  # as JAX runs it
    assert compute_dtype(np.float32, np.float64) == want64
    assert compute_dtype(np.float64, canonical=False) == np.float64


def test_a_request_holds_where_the_method_is_defined_in_it():
    ties, swudi = get_method("ties"), get_method("swudi")
    assert compute_dtype(np.float32, requested="bfloat16", defined_in=ties.compute_dtypes) == ml_dtypes.bfloat16
    assert compute_dtype(np.float32, requested="bfloat16", defined_in=swudi.compute_dtypes) == np.float32
    assert compute_dtype(requested="float64", defined_in=swudi.compute_dtypes, canonical=False) == np.float64
    assert swudi.work_dtype("float16") == "float32" and ties.work_dtype("float16") == "float16"


def test_with_no_request_mergekits_methods_compute_in_the_stored_dtype():
    """mergekit computes in the inputs' promoted dtype when the config names none; the spectral
    methods, defined in float32/float64 only, keep float32."""
    ties, swudi = get_method("ties"), get_method("swudi")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert compute_dtype(bf16, bf16, defined_in=ties.compute_dtypes) == bf16
    assert compute_dtype(np.float16, defined_in=ties.compute_dtypes) == np.float16
    assert compute_dtype(bf16, np.float16, defined_in=ties.compute_dtypes) == np.float32  # PyTorch's promotion
    assert compute_dtype(bf16, np.float32, defined_in=ties.compute_dtypes) == np.float32
    assert compute_dtype(bf16, defined_in=swudi.compute_dtypes) == np.float32
    assert compute_dtype(ml_dtypes.float8_e4m3fn, defined_in=ties.compute_dtypes) == np.float32

"""Strict numerics for the whole suite (STYLE.md 7).

* float64 is enabled, so numerics and gradient tests run in double precision; code under
  test that is meant to train in float32 must say so explicitly (and is tested that way).
* Rank promotion raises and dtype promotion is strict for every test, so an accidental
  broadcast or a silent float32 -> float64 mix is an error, not a wrong answer.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield

"""Strict numerics for the whole suite (STYLE.md 7).

* float64 is enabled, so numerics and gradient tests run in double precision; code under
  test that is meant to train in float32 must say so explicitly (and is tested that way).
* Rank promotion raises and dtype promotion is strict for every test, so an accidental
  broadcast or a silent float32 -> float64 mix is an error, not a wrong answer. Tests that
  drive third-party training code (optax schedules mix Python floats and float64 under
  x64) may opt into standard dtype promotion with ``@pytest.mark.standard_promotion``;
  rank promotion stays strict for them.
"""

import os
import sys

import jax
import pytest

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared helpers module


def pytest_configure(config):
    config.addinivalue_line("markers", "standard_promotion: run with jax_numpy_dtype_promotion='standard'")


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    dtype_mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion(dtype_mode):
        yield

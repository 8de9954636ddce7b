"""Strict numerics for the whole suite (STYLE.md 7).

* float64 is enabled, so numerics and gradient tests run in double precision; code under
  test that is meant to train in float32 must say so explicitly (and is tested that way).
* Rank promotion raises and dtype promotion is strict for every test, so an accidental
  broadcast or a silent float32 -> float64 mix is an error, not a wrong answer. Tests that
  drive third-party training code (optax schedules mix Python floats and float64 under
  x64) may opt into standard dtype promotion with ``@pytest.mark.standard_promotion``;
  rank promotion stays strict for them.
* XLA's CPU backend optimizations are turned down (``--xla_backend_optimization_level=0``)
  for the suite: the tests compile hundreds of tiny programs and compile time dominates
  (a single ``jax.random.normal`` took 3.7-4.7 s to compile here at the default level,
  0.66 s at level 0; the training tests went from 8.5 to 6 minutes). It changes LLVM code
  generation only: HLO, buffer assignment (the memory tests' numbers were identical) and
  float64 results to round-off stay the same. Subprocesses inherit it.
"""

import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402  (XLA_FLAGS must be set before the backend starts)
import pytest

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared helpers module
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # ... and the configs package at the repository root


def pytest_configure(config):
    config.addinivalue_line("markers", "standard_promotion: run with jax_numpy_dtype_promotion='standard'")


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    dtype_mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion(dtype_mode):
        yield

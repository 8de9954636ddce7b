"""The public API reads and runs as documented: every docstring example of the numerics executes, help() shows the contract.

The examples run under this suite's settings (float64, strict dtype promotion, raising
rank promotion: tests/conftest.py), so they print shapes, dtypes-independent values or
rounded numbers. Globals: the module's own, plus every name of ``anodev2_jax.__all__`` (as
after ``from anodev2_jax import *``), ``jax``, ``jnp`` and ``np``.
"""

import doctest
import importlib
import inspect
import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anodev2_jax

NUMERICS = ("rda", "ode", "evolution", "time_kernels", "trajectory", "adjoint", "coupled")


def _run_doctests(obj, globs, name):
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(obj, name, globs=globs)
    for test in tests:
        runner.run(test)
    return runner.summarize(verbose=False), len(tests)


@pytest.mark.parametrize("module", ["__init__", *NUMERICS])
def test_docstring_examples_run(module):
    mod = anodev2_jax if module == "__init__" else importlib.import_module(f"anodev2_jax.{module}")
    globs = dict(vars(mod))
    globs.update({name: getattr(anodev2_jax, name) for name in anodev2_jax.__all__}, jax=jax, jnp=jnp, np=np)
    if module == "__init__":
        (failed, attempted), _ = _run_doctests(mod.__doc__ and _DocOnly(mod.__doc__), globs, "anodev2_jax")
    else:
        (failed, attempted), _ = _run_doctests(mod, globs, mod.__name__)
    assert attempted > 0, f"{module} has no docstring examples"
    assert failed == 0, f"{failed} of {attempted} examples in {module} failed (see the output above)"


def test_get_model_example_runs():
    from anodev2_jax import models

    globs = dict(vars(models))
    (failed, attempted), _ = _run_doctests(models.get_model, globs, "get_model")
    assert attempted > 0 and failed == 0


class _DocOnly:
    """A holder for the package docstring alone (DocTestFinder would also walk the re-exported names)."""

    def __init__(self, doc):
        self.__doc__ = doc


def _documented_names():
    return [*anodev2_jax.__all__, "get_model"]


@pytest.mark.parametrize("name", _documented_names())
def test_every_public_name_documents_args_returns_an_equation_and_an_example(name):
    obj = getattr(anodev2_jax, name)
    doc = inspect.getdoc(obj) or ""
    lines = doc.splitlines()
    assert lines and lines[0].strip().endswith((".", ")", ":")) or len(lines[0]) > 20, f"{name}: one-line summary first"
    assert "Example" in doc and ">>>" in doc, f"{name}: no example"
    if inspect.isfunction(obj):
        params = [p for p in inspect.signature(obj).parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert not params or "Args:" in doc, f"{name}: no Args section"
        assert "Returns:" in doc, f"{name}: no Returns section"
        for p in params:  # every argument is named in Args (alone or in a group such as "f, z0, theta0:")
            assert p.name in doc, f"{name}: argument {p.name} undocumented"
    else:
        assert "Attributes:" in doc or name in ("DiracKernel",), f"{name}: no Attributes section"
    if name not in ("get_model",):
        assert "Eq." in doc, f"{name}: no paper equation"


def test_help_of_coupled_block_reads_like_a_reference_page():
    text = pydoc.render_doc(anodev2_jax.coupled_block, renderer=pydoc.plaintext)
    # the signature, the keyword order shared with discrete_adjoint's gradients, the sections, the contract
    assert "coupled_block(f: 'Callable', z0, theta0: 'PyTree', evolution: 'PyTree' = <required>, *, steps_z: 'int'" in text
    sig = inspect.signature(anodev2_jax.coupled_block).parameters
    assert list(sig).index("time_kernel") < list(sig).index("step_args")
    for needle in ("Eq. 2.3", "Input checks", "Args:", "Returns:", "Examples:", "NamedTuple", "time_kernel:", "has_aux:"):
        assert needle in text, needle


def test_package_namespace():
    assert "get_model" in dir(anodev2_jax) and "get_model" not in anodev2_jax.__all__
    namespace = {}
    exec("from anodev2_jax import *", namespace)
    assert set(anodev2_jax.__all__) <= set(namespace)

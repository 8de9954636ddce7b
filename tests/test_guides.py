"""The user-written ResNet-4s of docs/guides run as written, train a step and have our ResNet-4's parameter count."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax.models import count_params, get_model

GUIDES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides"


@pytest.mark.standard_promotion  # a user's code: JAX's default promotion (nnx.BatchNorm mixes in float32)
@pytest.mark.parametrize("guide", ["nnx_resnet4.md", "equinox_resnet4.md"])
def test_guide_runs_and_matches_our_resnet4(guide):
    path = GUIDES / guide
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= 2, f"{guide} has no python examples"
    namespace = {"__name__": "guide_example"}
    for block in blocks:  # the blocks build on each other, as a reader runs them
        exec(compile(block, str(path), "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    shapes = jax.eval_shape(get_model("resnet4", "anodev2_conf1").init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert namespace["num_params"] == count_params(shapes) == 7_970

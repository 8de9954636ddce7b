"""Run config: the fields of configs/*.py are exactly the validated ones; JSON form; resolved knobs; ranges; workdir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import default, smoke

from anodev2_jax import methods, run_config, steps, training

REPO = Path(__file__).resolve().parents[1]


def test_default_config_fields_are_the_validated_ones():
    for get_config in (default.get_config, smoke.get_config):
        config = get_config()
        training.validate_config(config)
        assert set(config.keys()) == set(run_config.FIELD_CHECKS)
    from configs import alexnet, resnet4, resnet10

    assert alexnet.get_config("anode").lr_boundaries_epochs == (40, 80, 100)
    assert (resnet4.get_config("anodev2_conf2").method, resnet10.get_config().model) == ("anodev2_conf2", "resnet10")
    config = resnet4.get_config("anodev2_conf1")
    assert training.default_workdir(config).startswith(os.path.join("runs", "resnet4-anodev2_conf1-seed0-"))


def test_config_dict_is_json_and_knobs_resolve_to_the_method_defaults():
    config = default.get_config("anodev2_conf2")
    cfg = run_config.config_dict(config)
    assert json.loads(json.dumps(cfg)) == cfg and cfg["lr_boundaries_epochs"] == [150, 300]
    assert run_config.knobs(config)["steps_z"] is None
    resolved = run_config.resolved_knobs(cfg)
    assert (resolved["steps_z"], resolved["steps_w"], resolved["schedule"]) == (2, 10, "endpoints")
    assert set(resolved) == set(run_config.KNOB_FIELDS)


def test_run_config_needs_neither_optax_nor_orbax():
    """reproduce reads RESUMABLE_FIELDS through run_config, which must stay light."""
    import subprocess
    import sys

    code = "import sys, anodev2_jax.run_config; print(sorted(m for m in ('optax', 'orbax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ranges_that_would_fail_in_the_middle_of_set_up():
    for overrides, match in (
        (dict(seed=3_000_000_000), r"config.seed=3000000000 is invalid: it must be an integer in \[0, 2147483647\]"),
        (dict(seed=2**31 - 1, num_seeds=2), "runs seeds up to 2147483648, beyond int32"),
        (dict(steps_z=100_000), r"steps_z=100000 is invalid: it must be an integer in \[1, 100\] or None .*unrolled"),
        (dict(steps_w=101), "steps_w=101 is invalid"),  # beyond what compiles in minutes (run_config.MAX_ODE_STEPS)
    ):
        config = default.get_config()
        for name, value in overrides.items():
            config[name] = value
        with pytest.raises(training.ConfigError, match=match):
            training.validate_config(config)
    config = default.get_config("anodev2_conf1")
    config.steps_z = config.steps_w = run_config.MAX_ODE_STEPS
    training.validate_config(config)  # the end of the range is in it


def test_workdir_expands_the_home_directory_and_refuses_empty():
    assert run_config.resolve_workdir("~/runs/x") == Path(os.path.expanduser("~/runs/x"))
    for empty in ("", "  "):
        with pytest.raises(training.ConfigError, match="--workdir is empty"):
            run_config.resolve_workdir(empty)


def test_remat_budget_field():
    config = default.get_config("anode")
    assert config.remat_budget_mb == methods.DEFAULT_REMAT_BUDGET_MB == run_config.ADDED_FIELDS["remat_budget_mb"]
    assert "remat_budget_mb" in run_config.RESUMABLE_FIELDS and "remat_budget_mb" not in run_config.KNOB_FIELDS
    for bad in (0, -1.0, float("inf")):
        config.remat_budget_mb = bad
        try:
            training.validate_config(config)
        except training.ConfigError as e:
            assert "config.remat_budget_mb" in str(e) and "--config.remat_budget_mb" in str(e)
        else:
            raise AssertionError(f"remat_budget_mb={bad} was accepted")
    cfg = run_config.config_dict(default.get_config("anodev2_conf1"))
    assert run_config.resolved_knobs(cfg)["remat"] == "auto"
    assert run_config.resolved_knobs(cfg, {"remat": "block"})["remat"] == "block"
    assert run_config.resolved_knobs({**cfg, "remat": "step"}, {"remat": "block"})["remat"] == "step"


def test_evolution_fields_and_the_runs_written_before_them():
    config = default.get_config("anodev2_conf1")
    assert (config.evolution, config.time_kernel, config.rda_parameterization, config.evolution_lr_scale) == (None, None, None, 1.0)
    assert {"evolution", "time_kernel", "rda_parameterization"} <= set(run_config.KNOB_FIELDS)
    knobs = run_config.resolved_knobs(run_config.config_dict(config))
    assert (knobs["evolution"], knobs["time_kernel"], knobs["rda_parameterization"]) == ("rda", "dirac", "abs")
    # a config.json from before the knobs: B.4 with d = softplus(rda_d_raw), as it trained
    old = {k: v for k, v in run_config.config_dict(config).items() if k not in run_config.ADDED_FIELDS}
    assert run_config.legacy_defaults(old) == {"rda_parameterization": "softplus", "remat": "block"}
    assert run_config.legacy_defaults({**old, "remat_budget_mb": 2048.0}) == {"rda_parameterization": "softplus"}
    assert run_config.resolved_knobs(old, run_config.legacy_defaults(old))["rda_parameterization"] == "softplus"
    assert run_config.legacy_defaults({**old, "method": "anode"}) == {"remat": "block"}
    for field, bad in (("evolution_lr_scale", 0.0), ("evolution_lr_scale", float("nan")), ("evolution_lr_scale", -2.0)):
        config = default.get_config("anodev2_conf1")
        config[field] = bad
        with pytest.raises(training.ConfigError, match=rf"config\.{field}=.*--config\.{field}"):
            training.validate_config(config)
    config = default.get_config("anodev2_conf1")
    config.evolution = "fourier"
    with pytest.raises(training.ConfigError, match=r"evolution='fourier' is not supported; use one of 'rda'"):
        steps.create_model(config)


def test_augment_field_and_the_runs_written_before_it():
    from configs import digits

    config = default.get_config()
    assert config.augment == "crop_flip" == run_config.ADDED_FIELDS["augment"]
    assert "augment" not in run_config.RESUMABLE_FIELDS  # another augmentation trains another run
    cfg = digits.get_config()
    training.validate_config(cfg)
    assert set(cfg.keys()) == set(run_config.FIELD_CHECKS)
    assert (cfg.dataset, cfg.augment, cfg.method, cfg.model) == ("digits", "crop", "anodev2_conf1", "resnet4")
    for bad in ("flip", None, "CROP"):
        config.augment = bad
        with pytest.raises(training.ConfigError, match=rf"config\.augment={bad!r} is invalid: it must be one of "
                           r"crop_flip, crop, none; fix --config\.augment"):  # fmt: skip
            training.validate_config(config)


def test_a_run_directory_without_augment_resumes_as_crop_flip(tmp_path):
    from anodev2_jax import rundir

    cfg = run_config.config_dict(smoke.get_config())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "augment"}))
    assert rundir.check_workdir(tmp_path, cfg) is not None  # crop_flip: the same run
    with pytest.raises(training.WorkdirMismatch, match="augment"):
        rundir.check_workdir(tmp_path, {**cfg, "augment": "crop"})


def test_unknown_field_suggests_the_close_one():
    config = default.get_config()
    with config.unlocked():
        config.metod = "anode"
    with pytest.raises(training.ConfigError, match=r"unknown config field\(s\) metod \(did you mean method\?\); remove"):
        training.validate_config(config)


def test_float64_training_needs_64_bit_jax():
    """config.dtype='float64' is the whole model in float64; without JAX_ENABLE_X64 it is one line, before any work."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from configs import default; "
        "from anodev2_jax import run_config; from anodev2_jax.errors import ConfigError\n"
        "config = default.get_config(); config.dtype = 'float64'\n"
        "assert run_config.knobs(config)['dtype'] == 'float64' and run_config.knobs(config)['compute_dtype'] is None\n"
        "try:\n    run_config.validate_config(config)\nexcept ConfigError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == (
        "config.dtype='float64' needs 64-bit JAX, which is off; set JAX_ENABLE_X64=1 in the environment "
        "(or use --config.dtype=float32)"
    )

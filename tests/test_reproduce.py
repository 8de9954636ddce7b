"""anodev2_jax.reproduce: aggregation and tables on fake summary.json files; one short end-to-end run.

The aggregation reads only ``summary.json`` files, so most tests write fake ones (the
fields ``training.train_and_evaluate`` writes) and check the markdown. The end-to-end test
trains ResNet-4 baseline and ANODEV2 configuration 2 (Table 2) for one step on 8
synthetic images (the setup of tests/test_training.py's one-step runs, so in one session
the compiled programs are shared), then checks that a rerun trains nothing.
"""

import json
import time

import jax
import jax.numpy as jnp
import pytest

from anodev2_jax import methods, models, paper, reproduce


def write_summary(root, model, method, accs, num_params=1234, config=None, epochs=3):
    d = reproduce.run_dir(root, model, method)
    d.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": model,
        "method": method,
        "test_accuracy": list(accs),
        "test_loss": [1.0] * len(accs),
        "num_params": num_params,
        "wall_time_s": 1.0,
        "images_per_s": 10.0,
        "epochs": epochs,
    }
    if config is not None:
        summary["config"] = config
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def table_rows(text):
    """``{first cell: [other cells]}`` of the markdown table rows in ``text``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- constants


def test_names_and_table3_agree_with_models():
    assert reproduce.MODELS == methods.MODELS
    assert reproduce.METHODS == methods.METHODS
    assert reproduce.PAPER_PARAMS == paper.PAPER_PARAMS  # the one Table 3, also printed by models.main
    assert set(reproduce.PAPER_ACCURACY) == set(methods.MODELS)
    for model in methods.MODELS:
        assert set(reproduce.PAPER_ACCURACY[model]) == set(methods.METHODS)
        for lo, hi, avg in reproduce.PAPER_ACCURACY[model].values():
            assert lo <= avg <= hi


def test_paper_improvements_match_the_papers_imp_rows():
    # Table 1's "Imp." row, computed from the stored numbers as the report does
    p = reproduce.PAPER_ACCURACY
    imp = [round(p["alexnet"]["anodev2_conf1"][i] - p["alexnet"]["baseline"][i], 2) for i in range(3)]
    assert imp == [1.75, 1.81, 1.75]
    # Table 4: ANODEV2 conf. 2 over ANODE, avg: 0.24%, 0.43%, 0.33%
    gains = [round(p[m]["anodev2_conf2"][2] - p[m]["anode"][2], 2) for m in methods.MODELS]
    assert gains == [0.24, 0.43, 0.33]


def test_methods_for_tables():
    assert reproduce.methods_for([1]) == ("baseline", "anodev2_conf1")
    assert reproduce.methods_for([2]) == ("baseline", "anodev2_conf2")
    assert reproduce.methods_for([4, 1]) == ("baseline", "neural_ode", "anode", "anodev2_conf1", "anodev2_conf2")
    with pytest.raises(ValueError, match="table 3"):
        reproduce.methods_for([3])


# ----------------------------------------------------------------------------- aggregation


def test_accuracy_stats():
    lo, hi, avg = reproduce.accuracy_stats({"test_accuracy": [0.5, 0.75, 0.625]})
    assert (lo, hi) == (50.0, 75.0) and avg == pytest.approx(62.5)
    assert reproduce.accuracy_stats({"test_accuracy": 0.25}) == (25.0, 25.0, 25.0)
    with pytest.raises(ValueError, match="non-empty list"):
        reproduce.accuracy_stats({"test_accuracy": []}, "x/summary.json")
    with pytest.raises(ValueError, match="fraction"):
        reproduce.accuracy_stats({"test_accuracy": [76.5]})


def test_table1_from_fake_results(tmp_path):
    write_summary(tmp_path, "resnet4", "baseline", [0.70, 0.74, 0.72])
    write_summary(tmp_path, "resnet4", "anodev2_conf1", [0.75, 0.79, 0.77])
    write_summary(tmp_path, "alexnet", "baseline", [0.80])
    results = reproduce.load_results(tmp_path, ["alexnet", "resnet4"], reproduce.METHODS)
    assert results["resnet4"]["anode"] is None

    text = reproduce.format_accuracy_table(1, results, ["alexnet", "resnet4"])
    assert text.startswith("**Table 1")
    rows = table_rows(text)
    header = rows[""]
    assert header == ["AlexNet Min / Max", "AlexNet Avg", "ResNet-4 Min / Max", "ResNet-4 Avg"]
    assert rows["Baseline"] == [
        "80.00% / 80.00% (86.84% / 87.15%)", "80.00% (87.03%)",
        "70.00% / 74.00% (76.47% / 77.35%)", "72.00% (76.95%)",
    ]
    assert rows["ANODEV2 conf. 1"] == [
        "— / — (88.59% / 88.96%)", "— (88.78%)",
        "75.00% / 79.00% (77.27% / 78.58%)", "77.00% (78.11%)",
    ]
    assert rows["Imp."] == [
        "— / — (+1.75% / +1.81%)", "— (+1.75%)",
        "+5.00% / +5.00% (+0.80% / +1.23%)", "+5.00% (+1.16%)",
    ]
    assert "3 epoch(s)" in text and "1/3 seed(s)" in text


def test_table4_rows_and_comparisons(tmp_path):
    for method, acc in [("baseline", 0.6), ("neural_ode", 0.3), ("anode", 0.62), ("anodev2_conf2", 0.65)]:
        write_summary(tmp_path, "resnet10", method, [acc, acc + 0.02])
    results = reproduce.load_results(tmp_path, ["resnet10"], reproduce.METHODS)
    rows = table_rows(reproduce.format_accuracy_table(4, results, ["resnet10"]))
    assert list(rows)[1:5] == ["Baseline", "NeuralODE [8]", "ANODE [9]", "ANODEV2 conf. 2"]
    assert rows["NeuralODE [8]"][1] == "31.00% (67.94%)"
    assert rows["Imp. ANODEV2 conf. 2 vs ANODE [9]"][1] == "+3.00% (+0.33%)"
    assert rows["Imp. NeuralODE [8] vs Baseline"][0] == "-30.00% / -30.00% (-23.09% / -18.46%)"


def test_param_table(tmp_path):
    write_summary(tmp_path, "resnet4", "baseline", [0.5], num_params=7706)
    results = reproduce.load_results(tmp_path, ["resnet4"], reproduce.METHODS)
    counts = reproduce.param_counts(results, ["resnet4"])
    assert counts["baseline"]["resnet4"] == 7706 and counts["anode"]["resnet4"] is None
    rows = table_rows(reproduce.format_param_table(counts, ["resnet4"]))
    assert rows["Baseline"] == ["7,706 (7.71K)"]
    assert rows["ANODEV2 conf. 1"] == ["— (8.23K)"]
    # methods without a run are counted from the model (shapes only)
    computed = reproduce.param_counts(results, ["resnet4"], compute_missing={})
    net = models.get_model("resnet4", "anodev2_conf2")
    shapes = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert computed["anodev2_conf2"]["resnet4"] == models.count_params(shapes["params"])


def test_unreadable_summary_names_the_file(tmp_path):
    d = reproduce.run_dir(tmp_path, "resnet4", "baseline")
    d.mkdir(parents=True)
    (d / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        reproduce.load_results(tmp_path, ["resnet4"], ["baseline"])


def test_report_only_cli_on_fake_results(tmp_path, capsys):
    write_summary(tmp_path, "resnet4", "baseline", [0.70, 0.74])
    write_summary(tmp_path, "resnet4", "anodev2_conf2", [0.75, 0.79])
    out = tmp_path / "tables.md"
    rc = reproduce.main(["--model", "resnet4", "--table", "2", "4", "--workdir", str(tmp_path), "--report-only", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "**Table 2" in text and "**Table 4" in text and "**Table 3" in text and "**Table 1" not in text
    assert table_rows(text.split("**Table 4")[0])["Baseline"][1] == "72.00% (76.95%)"
    assert table_rows(text.split("**Table 3")[1])["ANODEV2 conf. 2"] == ["1,234 (7.99K)"]  # from summary.json
    assert "training" not in capsys.readouterr().out  # nothing trained


def test_cli_bad_input(tmp_path, capsys):
    assert reproduce.main(["--table", "3", "--workdir", str(tmp_path), "--report-only"]) == 2
    assert "--table '3'" in capsys.readouterr().err
    assert reproduce.main(["--model", "vgg", "--workdir", str(tmp_path), "--report-only"]) == 2
    assert "--model 'vgg'" in capsys.readouterr().err
    assert reproduce.main(["--dataset", "mnist", "--workdir", str(tmp_path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "config.dataset='mnist' is invalid" in err and "digits" in err and "fix --dataset" in err
    assert "--config." not in err  # train.py's flags are none of this command's
    assert not (tmp_path / "results.md").exists()


def test_augment_flag(tmp_path, capsys):
    assert reproduce.make_config("resnet4", "baseline", {"augment": "crop", "dataset": "digits"}).augment == "crop"
    assert reproduce.main(["--augment", "flip", "--workdir", str(tmp_path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "config.augment='flip' is invalid: it must be one of crop_flip, crop, none; fix --augment" in err


def test_data_errors_name_this_commands_flags(tmp_path, capsys):
    """A message written for train.py's --config.FIELD reads in reproduce's own flags."""
    args = ["--dataset", "cifar10_local", "--epochs", "1", "--workdir", str(tmp_path / "runs")]
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'cifar10_local' needs --data-dir DIR" in err and "--config." not in err
    assert not (tmp_path / "runs").exists()
    text = reproduce.own_flags(
        "lower --config.batch_size or raise --config.num_train; or use --config.dataset=cifar10_local "
        "--config.data_dir=DIR; fix --config.steps_z"
    )
    assert text == (
        "lower --batch-size or raise --num-train; or use --dataset cifar10_local --data-dir DIR; fix steps_z "
        "(a field of configs/<model>.py; this command has no flag for it)"
    )


def test_evolution_table_rows_and_report(tmp_path, capsys):
    rows = reproduce.rows_for(["evolution"])
    assert [r for r, _, _ in rows] == list(reproduce.EVOLUTION_ROWS)
    assert dict((r, (m, e)) for r, m, e in rows)["conf1_mlp"] == ("anodev2_conf1", {"evolution": "mlp"})
    assert [r for r, _, _ in reproduce.rows_for([2, "evolution"])][:5] == list(methods.METHODS)  # shared run dirs
    assert reproduce.parse_tables(["evolution", "2", "1"]) == [1, 2, "evolution"]
    write_summary(tmp_path, "resnet4", "baseline", [0.80, 0.84])
    d = write_summary(tmp_path, "resnet4", "conf1_linear", [0.81, 0.87])
    record = {"step": 3, "evolution": "linear", "time_kernel": None, "kernels": [
        {"path": "layer1_1/conv1", "evolution": "linear dw/dt = G w: max abs G=0.1", "relative_change": [0.01, 0.03]},
        {"path": "layer1_1/conv2", "evolution": "linear dw/dt = G w: max abs G=0.2", "relative_change": [0.02, 0.05]},
    ]}  # fmt: skip
    (d / reproduce.EVOLUTION_FILE).write_text(json.dumps(record))
    out = tmp_path / "r.md"
    assert reproduce.main(["--table", "evolution", "--workdir", str(tmp_path), "--report-only", "--out", str(out)]) == 0
    text = out.read_text()
    acc = table_rows(text.split("**What the evolution learned")[0])
    assert acc["Baseline (ResNet)"] == ["80.00% / 84.00%", "82.00%", ""]
    assert acc["Conf. 1, q = linear (dw/dt = G w)"] == ["81.00% / 87.00%", "84.00%", "+2.00%"]
    assert acc["Conf. 1, q = MLP"] == ["— / —", "—", "—"]
    learned = table_rows(text.split("**What the evolution learned")[1].split("**Table 3")[0])
    assert learned["Conf. 1, q = linear (dw/dt = G w)"] == ["ResNet-4", "linear dw/dt = G w: max abs G=0.1", "0.010 / 0.050", "—"]
    assert reproduce.main(["--table", "evolution", "--workdir", str(tmp_path), "--only", "conf1_fourier"]) == 2
    assert "--only conf1_fourier: not a row" in capsys.readouterr().err


# ----------------------------------------------------------------------------- configs and resume


def test_make_config_scales_the_schedule():
    full = reproduce.make_config("resnet4", "anodev2_conf1", {})
    assert full.num_epochs == 350 and tuple(full.lr_boundaries_epochs) == (150, 300)
    short = reproduce.make_config("resnet4", "anodev2_conf1", {"num_epochs": 35, "num_seeds": 5, "dataset": None})
    assert short.num_epochs == 35 and tuple(short.lr_boundaries_epochs) == (15, 30) and short.num_seeds == 5
    assert short.dataset == "cifar10"  # None leaves the config's value
    assert tuple(reproduce.make_config("alexnet", "baseline", {"num_epochs": 12}).lr_boundaries_epochs) == (4, 8, 10)
    assert tuple(reproduce.make_config("resnet4", "baseline", {"num_epochs": 1}).lr_boundaries_epochs) == ()
    with pytest.raises(ValueError, match="no field 'epochs'"):
        reproduce.make_config("resnet4", "baseline", {"epochs": 3})


def test_is_done_compares_the_config(tmp_path):
    config = reproduce.make_config("resnet4", "baseline", {"num_epochs": 2, "dataset": "synthetic"})
    plain = json.loads(json.dumps(config.to_dict()))
    d = write_summary(tmp_path, "resnet4", "baseline", [0.5], config=plain)
    assert reproduce.is_done(d, config)
    config.data_dir = "/elsewhere"  # where the data lives does not matter
    assert reproduce.is_done(d, config)
    config.num_epochs = 4  # a longer run is not done: training extends it
    assert not reproduce.is_done(d, config)
    assert not reproduce.is_done(tmp_path / "nothing", config)
    d2 = write_summary(tmp_path, "resnet4", "anode", [0.5])  # no config record: taken as done
    assert reproduce.is_done(d2, config)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # 50-60 s on 2 shared CPU cores; shares its compiled programs with test_training.py
def test_end_to_end_table2_synthetic(tmp_path, capsys):
    args = [
        "--model", "resnet4", "--table", "2", "--dataset", "synthetic", "--epochs", "1",
        "--num-train", "8", "--num-test", "16", "--batch-size", "8", "--learning-rate", "0.02", "--num-seeds", "1",
        "--workdir", str(tmp_path),
    ]
    t0 = time.perf_counter()
    assert reproduce.main(args) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert out.count(": training 1 seed(s) for 1 epoch(s)") == 2
    for method in ("baseline", "anodev2_conf2"):
        summary = json.loads((tmp_path / "resnet4" / method / "summary.json").read_text())
        assert len(summary["test_accuracy"]) == 1
    text = (tmp_path / "results.md").read_text()
    rows = table_rows(text.split("**Table 3")[0])
    assert rows["Baseline"][0].endswith("(76.47% / 77.35%)") and not rows["Baseline"][0].startswith("—")
    assert not rows["ANODEV2 conf. 2"][1].startswith("—")
    assert "dataset synthetic, 1 epoch(s), 1 seed(s)" in text

    # resume: a rerun trains nothing and writes the same tables
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "training" not in out
    assert (tmp_path / "results.md").read_text() == text

    # More --epochs for the finished short runs: another (scaled) schedule, refused before
    # anything trains, with the fix in this command's flags (train.py's --config.X is none).
    longer = [*args]
    longer[longer.index("--epochs") + 1] = "2"
    assert reproduce.main(longer) == 2
    err = capsys.readouterr().err
    assert "lr_boundaries_epochs=[]" in err and "rerun with the --epochs that run was made with" in err, err
    assert "--config." not in err and "\n" not in err.strip()
    print(f"end-to-end first run: {elapsed:.1f} s")

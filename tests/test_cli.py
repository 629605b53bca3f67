"""The ``tfq`` command and the scripts, run as a user runs them: in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tfq
from tests.conftest import tflite_accuracy

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the benchmark lives in scripts/, not in the package
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


def tfq_cmd(*args):
    return run("-m", "tfq.cli", *args)


@pytest.fixture(scope="module")
def files(trained_cnn, digits, tmp_path_factory):
    model, _ = trained_cnn
    (x_train, y_train), (x_test, y_test) = digits
    d = tmp_path_factory.mktemp("cli")
    model.save(d / "m.keras")
    np.savez(d / "calib.npz", x=x_train[:200])
    np.savez(d / "test.npz", x=x_test, y=y_test)
    return d


def test_convert_and_inspect(files, digits):
    _, (x_test, y_test) = digits
    out = files / "m_int8.tflite"
    proc = tfq_cmd("convert", f"--model={files / 'm.keras'}", "--mode=int8", f"--data={files / 'calib.npz'}",
                   "--calibration=kl", "--io_dtype=int8", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 float ops" in proc.stdout
    info = tfq.inspect_tflite(out)
    assert info.is_fully_integer
    assert tflite_accuracy(out.read_bytes(), x_test, y_test) > 0.9
    proc = tfq_cmd("inspect", f"--tflite={out}")
    assert proc.returncode == 0 and "CONV_2D" in proc.stdout and "float ops: 0" in proc.stdout


def test_inspect_into_a_pipe_closed_early(files, trained_cnn):
    """``tfq inspect … | head``: the reader going away is not an error (no "Broken pipe", status 141
    as for any Unix tool), whatever amount was written."""
    out = files / "m_float_pipe.tflite"
    out.write_bytes(tfq.convert(trained_cnn[0], "float"))
    listing = ",".join([str(out)] * 400)  # far more than a pipe buffer holds
    proc = subprocess.Popen([sys.executable, "-m", "tfq.cli", "inspect", f"--tflite={listing}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert first.startswith(b"# ") and "Broken pipe" not in err and "Traceback" not in err, err


def test_evaluate_prints_table(files, trained_cnn):
    tflite = files / "m_dyn.tflite"
    tflite.write_bytes(tfq.convert(trained_cnn[0], "dynamic"))
    report_path = files / "report.json"
    proc = tfq_cmd("evaluate", f"--model={files / 'm.keras'}", f"--tflite={tflite}", f"--data={files / 'test.npz'}",
                   f"--output={report_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| m_dyn |" in proc.stdout and "accuracy" in proc.stdout
    rows = {r["name"]: r for r in json.loads(report_path.read_text())["rows"]}
    assert rows["m_dyn"]["accuracy"] == pytest.approx(rows["m"]["accuracy"], abs=0.01)


def test_scripts_help_and_export(files):
    for script in ("export_tflite.py", "evaluate.py", "tune.py", "benchmark.py", "train_qat.py", "prune_and_quantize.py"):
        proc = run(str(REPO / "scripts" / script), "--help")
        assert proc.returncode == 0, (script, proc.stderr[-1000:])
        assert "--" in proc.stdout and "python scripts/" in proc.stdout, script
    out = files / "script.tflite"
    proc = run(str(REPO / "scripts" / "export_tflite.py"), f"--model={files / 'm.keras'}", "--mode=fp16",
               f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(t.dtype == "FLOAT16" for t in tfq.inspect_tflite(out).tensors)


def test_tune_command(files):
    out = files / "tuned"
    proc = run(str(REPO / "scripts" / "tune.py"), f"--model={files / 'm.keras'}", f"--data={files / 'calib.npz'}",
               f"--eval_data={files / 'test.npz'}", "--max_drop=0.02", "--max_trials=2", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.tflite").exists() and (out / "recipe.yaml").exists()
    assert "target drop" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "--mode=int8", "--output=x.tflite"], "--model is required"),
        (["convert", "--model=missing.keras", "--mode=float", "--output=x.tflite"], "model not found"),
        (["frobnicate"], "expected a command"),
        (["evaluate", "--data=nothere.npz", "--tflite=a.tflite"], "file not found"),
    ],
)
def test_bad_command_lines_fail_with_one_line(args, message, tmp_path):
    proc = run("-m", "tfq.cli", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("tfq")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-1000:]
    assert not (tmp_path / "x.tflite").exists()


def test_convert_method_flags_are_validated(files):
    out = files / "bad_method.tflite"
    proc = tfq_cmd("convert", f"--model={files / 'm.keras'}", "--mode=int8", f"--data={files / 'calib.npz'}",
                   "--weight_rounding=optimal", f"--output={out}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("tfq")]
    assert len(lines) == 1 and "weight_rounding" in lines[0] and "'optimal'" in lines[0], proc.stderr[-1000:]
    assert not out.exists()


@pytest.mark.slow
def test_convert_data_free_with_equalization_and_bias_correction(files, digits):
    _, (x_test, y_test) = digits
    out = files / "dfq.tflite"
    proc = tfq_cmd("convert", f"--model={files / 'm.keras'}", "--mode=int8", "--data_free=on", "--equalize",
                   "--bias_correction=analytical", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tfq.inspect_tflite(out).num_float_ops == 0
    assert tflite_accuracy(out.read_bytes(), x_test, y_test) > 0.9


def test_corrupt_tflite_rejected(files):
    bad = files / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    proc = tfq_cmd("evaluate", f"--tflite={bad}", f"--data={files / 'test.npz'}")
    assert proc.returncode == 2 and "not a TFLite model" in proc.stderr


def test_train_qat_script(files, digits):
    _, (x_test, y_test) = digits
    (x_train, y_train), _ = digits
    np.savez(files / "train.npz", x=x_train, y=y_train)
    out = files / "qat_out"
    proc = run(str(REPO / "scripts" / "train_qat.py"), f"--model={files / 'm.keras'}", f"--data={files / 'train.npz'}",
               f"--eval_data={files / 'test.npz'}", "--epochs=1", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    content = (out / "qat_int8.tflite").read_bytes()
    assert tfq.inspect_tflite(content).num_float_ops == 0
    assert tflite_accuracy(content, x_test, y_test) > 0.9
    assert (out / "qat.keras").exists() and (out / "qat_epoch01.tflite").exists()


def test_prune_and_quantize_script(files, digits):
    (x_train, y_train), (x_test, y_test) = digits
    np.savez(files / "train.npz", x=x_train, y=y_train)
    out = files / "pruned.tflite"
    proc = run(str(REPO / "scripts" / "prune_and_quantize.py"), f"--model={files / 'm.keras'}",
               f"--data={files / 'train.npz'}", f"--eval_data={files / 'test.npz'}", "--target_sparsity=0.5",
               "--epochs=1", "--qat_epochs=0", "--skip_layers=conv1", f"--output={out}",
               f"--save_keras={files / 'pruned.keras'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    content = out.read_bytes()
    info = tfq.inspect_tflite(content)
    assert info.num_float_ops == 0
    by_layer = {name: next(w for w in info.weights if f"/{name}" in w.name) for name in ("conv1", "conv2", "fc1")}
    assert by_layer["conv1"].sparsity < 0.1 and by_layer["conv2"].sparsity >= 0.5 and by_layer["fc1"].sparsity >= 0.5
    accuracy = tflite_accuracy(content, x_test, y_test)
    assert accuracy > 0.9 and f"pruned INT8 {accuracy:.4f}" in proc.stdout
    assert f"gzip: {info.gzip_size:,} bytes" in proc.stdout
    import keras

    pruned = keras.models.load_model(files / "pruned.keras")  # a plain Keras model: no tfq class in it
    assert tfq.pruning.sparsity_of(pruned)["conv2"] == pytest.approx(0.5)
    proc = run(str(REPO / "scripts" / "prune_and_quantize.py"), f"--model={files / 'm.keras'}",
               f"--data={files / 'train.npz'}", "--target_sparsity=1.5", f"--output={files / 'bad.tflite'}")
    assert proc.returncode == 2 and not (files / "never_written.tflite").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("prune_and_quantize: target_sparsity must be")


@pytest.mark.slow
def test_benchmark_script_quick(tmp_path):
    from benchmark_lib import CALIBRATION_METHODS_BENCHED

    out = tmp_path / "results.json"
    proc = run(str(REPO / "scripts" / "benchmark.py"), "--quick", "--models=digits_cnn", "--compression", "--nomethods",
               "--qat_cost=digits_cnn", "--qat_bn_folding=unfolded,two_pass", "--qat_logits_range=tensor,softmax",
               f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    model = results["models"][0]
    names = [r["name"] for r in model["ptq"]]
    assert names[0] == "tflite_converter_minmax" and {f"tfq_{m}" for m in
                                                      ("minmax", "moving_average", "kl", "percentile", "mse")} <= set(names)
    for row in model["ptq"] + model["ptq_outliers"]:
        assert 0 <= row["accuracy"] <= 1 and row["size_ratio"] < 0.35 and row["latency_ms"] > 0
    assert {r["name"] for r in model["qat"]} == {"tfq_qat", "tfmot_qat"}
    for row in model["qat"]:  # tfmot's row comes from a tf_keras subprocess: a result, not an error row
        assert "error" not in row and 0 <= row["accuracy"] <= 1, row
    ev = model["evaluator"]
    assert ev["samples"] == 2 * len(tfq.datasets.load_digits()[1][0]) and ev["num_threads"] == 2
    assert ev["throughput_ratio"] == pytest.approx(ev["per_sample_loop_seconds"] / ev["evaluate_seconds"])
    assert ev["ceiling_ratio"] == pytest.approx(ev["per_sample_loop_seconds"] / ev["compute_floor_seconds"])
    rows = {r["name"]: r for r in results["compression"]["rows"]}
    assert set(rows) == {"float", "dense_int8", "pruned50_int8", "pruned75_int8", "pruned90_int8", "clustered16_int8",
                         "student_labels_int8", "student_distilled_int8", "tfmot_pruned75_int8"}
    for name in ("pruned50_int8", "pruned75_int8", "pruned90_int8"):
        assert rows[name]["keras_sparsity"] == pytest.approx(int(name[6:8]) / 100, abs=1e-3)
        assert rows[name]["gzip_bytes"] < rows["dense_int8"]["gzip_bytes"] and rows[name]["num_float_ops"] == 0
    assert rows["clustered16_int8"]["max_distinct_per_channel"] <= 16
    tfmot_pruned = rows["tfmot_pruned75_int8"]
    assert "error" not in tfmot_pruned, tfmot_pruned
    dense_gzip = rows["dense_int8"]["gzip_bytes"]
    assert tfmot_pruned["gzip_vs_dense_int8"] == pytest.approx(tfmot_pruned["gzip_bytes"] / dense_gzip)
    assert rows["pruned90_int8"]["gzip_bytes"] < rows["pruned75_int8"]["gzip_bytes"] < rows["pruned50_int8"]["gzip_bytes"]
    (cost,) = results["qat_cost"]["models"]
    assert cost["model"] == "digits_cnn" and [r["name"] for r in cost["rows"]] == ["tfq_qat"] * 4 + ["tfmot_qat"]
    assert [(r.get("bn_folding"), r.get("logits_range")) for r in cost["rows"][:4]] == [
        (None, None), (None, "softmax"), ("two_pass", None), ("two_pass", "softmax")]
    for row in cost["rows"]:
        assert row["step_time_ratio"] == pytest.approx(row["qat_epoch_s"] / row["float_epoch_s"])
        agree = abs(np.log(row["step_time_ratio"] / row["cpu_time_ratio"])) <= np.log(1.15)
        assert row["timing_consistent"] is bool(agree)
        assert 0 <= row["accuracy"] <= 1
    assert cost["rows"][0]["num_float_ops"] == cost["rows"][1]["num_float_ops"] == 0
    throughput = results["calibration_throughput"]
    assert [r["method"] for r in throughput["throughput"]] == list(CALIBRATION_METHODS_BENCHED)
    for row in throughput["throughput"]:
        assert row["samples"] == 256 and row["samples_per_s"] == pytest.approx(row["samples"] / row["seconds"])
    assert {(r["method"], r["samples"]) for r in throughput["memory"]} == {
        (m, n) for m in ("robust_minmax", "minmax", "kl", "mse_batch_median") for n in (512, 1024)}


def test_qat_cost_table_prints_a_disturbed_timing_as_such():
    """A best-of wall ratio far from the CPU-time one (every float epoch slowed, one QAT epoch not:
    ×0.72 against ×1.10, seen on this machine) is printed as disturbed, not as a figure."""
    from benchmark_lib import timing_consistent, qat_cost_markdown

    assert timing_consistent(1.03, 1.04) and timing_consistent(1.12, 1.21)
    assert not timing_consistent(0.72, 1.10) and not timing_consistent(1.40, 1.05)
    row = {"name": "tfq_qat", "step_time_ratio": 0.72, "cpu_time_ratio": 1.10, "round_ratios": [1.0, 0.72],
           "accuracy": 0.97}
    section = {"models": [{"model": "m", "float_accuracy": 0.9, "rows": [
        {**row, "timing_consistent": False}, {**row, "step_time_ratio": 1.08, "timing_consistent": True}]}]}
    disturbed, sound = qat_cost_markdown(section).splitlines()[2:]
    assert "disturbed (wall ×0.72 against CPU ×1.10)" in disturbed and "| ×0.72 |" not in disturbed
    assert "| ×1.08 | ×1.10 |" in sound


def test_benchmark_tfmot_rows_start_from_tfqs_float_weights(tmp_path, trained_mobilenet):
    """The benchmark's tfmot QAT starts from tfq's float model: its weights, saved by layer name from
    Keras 3 and loaded into the tf_keras build (another process), give the same predictions."""
    from benchmark_lib import save_weights_by_layer

    model, _, (x_test, _), _ = trained_mobilenet
    x = x_test[:64]
    expected = model.predict(x, verbose=0)
    save_weights_by_layer(model, tmp_path / "w.npz")
    np.save(tmp_path / "x.npy", x)
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); "
            "import numpy as np, tf_keras; from tfq import examples; from benchmark_lib import load_weights_by_layer; "
            f"x = np.load({str(tmp_path / 'x.npy')!r}); "
            "m = examples.mobilenet_style(input_shape=x.shape[1:], keras_module=tf_keras); "
            f"load_weights_by_layer(m, {str(tmp_path / 'w.npz')!r}); "
            f"np.save({str(tmp_path / 'y.npy')!r}, m.predict(x, verbose=0))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(ENV, TF_USE_LEGACY_KERAS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    assert expected.std(axis=0).max() > 0.01  # the predictions depend on the input: not a constant model
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_benchmark_methods_quick(tmp_path):
    out, table = tmp_path / "methods.json", tmp_path / "methods.md"
    proc = run(str(REPO / "scripts" / "benchmark.py"), "--quick", "--models=", "--qat_cost=", "--nocalibration",
               f"--output={out}", f"--markdown={table}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    methods = json.loads(out.read_text())["methods"]
    names = [(r["granularity"], r["name"]) for r in methods["int8"]]
    assert names == [("-", "float (Keras)"), ("per-channel", "tflite_converter_minmax"), ("per-tensor", "tfq_minmax"),
                     ("per-tensor", "equalize"), ("per-tensor", "gptq")]
    for row in methods["int8"][1:] + methods["w4a8"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["agreement"] <= 1 and row["convert_seconds"] > 0
    assert methods["int8"][3]["seconds"]["equalize"] > 0 and methods["int8"][4]["seconds"]["weight_rounding"] > 0
    assert [r["name"] for r in methods["w4a8"]] == ["w4a8_nearest", "w4a8_gptq"]
    assert "| weights | method |" in table.read_text()


# ------------------------------------------------------------------ per-command help and flags (issue 32 item 4)

def _listed_flags(text: str) -> list[str]:
    return [line.split(":")[0].strip().replace("--[no]", "--")[2:] for line in text.splitlines()
            if line.startswith("  --")]


CONVERT_FLAGS = ["model", "mode", "data", "calibration", "percentile", "recipe", "io_dtype", "float_layers",
                 "int16_layers", "per_channel", "num_samples", "output", "quiet", "equalize", "bias_correction", "weight_rounding",
                 "data_free", "method"]
TUNE_FLAGS = ["model", "data", "eval_data", "output_dir", "max_drop", "objective", "strategy", "max_trials", "seed",
              "quiet"]


def test_help_lists_only_the_commands_flags():
    proc = tfq_cmd("convert", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("tfq convert: ") and "tfq convert --model=m.keras" in proc.stdout
    assert _listed_flags(proc.stdout) == CONVERT_FLAGS  # in definition order
    assert "Cap on calibration samples." in proc.stdout and "(default: 'int8')" in proc.stdout
    proc = tfq_cmd("tune", "-h")
    assert proc.returncode == 0 and sorted(_listed_flags(proc.stdout)) == sorted(TUNE_FLAGS)
    assert "--calibration" not in proc.stdout and "--explain" not in proc.stdout
    for command, flags in (("inspect", ["tflite", "quiet", "explain", "data"]),
                           ("evaluate", ["model", "data", "output", "tflite", "num_threads", "max_samples", "quiet"]),
                           ("quickstart", ["output_dir", "epochs", "qat_epochs", "seed", "quiet"])):
        proc = tfq_cmd(command, "--help")
        assert proc.returncode == 0 and sorted(_listed_flags(proc.stdout)) == sorted(flags), (command, proc.stdout)
    proc = tfq_cmd("--help")  # the commands, and the flags every command reads
    assert proc.returncode == 0 and _listed_flags(proc.stdout) == ["quiet"]
    assert all(f"\n  {c} " in proc.stdout for c in ("quickstart", "convert", "evaluate", "inspect", "tune"))
    proc = run(str(SCRIPTS / "export_tflite.py"), "--help")  # a script wrapping one command: its flags
    assert proc.returncode == 0 and _listed_flags(proc.stdout) == CONVERT_FLAGS
    assert "python scripts/export_tflite.py" in proc.stdout


def test_every_flag_belongs_to_a_command():
    """A flag added to tfq/cli/commands.py is listed in COMMAND_FLAGS or its help starts with "Convert:" …;
    otherwise every command would read it."""
    from absl import flags

    from tfq.cli import commands as cli

    defined = {f.name for f in flags.FLAGS.get_flags_for_module(cli.__name__)}
    listed = set(cli.COMMON_FLAGS).union(*cli.COMMAND_FLAGS.values())
    prefixed = {name for name in defined if flags.FLAGS[name].help.split(":")[0].lower() in cli.COMMANDS}
    assert defined == listed | prefixed, defined ^ (listed | prefixed)
    everywhere = [n for n in defined if all(n in cli.flags_of(c) for c in cli.COMMANDS)]
    assert everywhere == ["quiet"]


@pytest.mark.parametrize("command, flag, owners", [("convert", "--max_trials=5", "tune"),
                                                   ("inspect", "--model=m.keras", "convert and evaluate and tune"),
                                                   ("tune", "--calibration=kl", "convert"),
                                                   ("evaluate", "--explain", "inspect")])
def test_a_flag_of_another_command_is_refused(tmp_path, command, flag, owners):
    out = tmp_path / "x.tflite"
    proc = run("-m", "tfq.cli", command, flag, f"--output={out}" if command in ("convert", "evaluate") else "--quiet",
               cwd=tmp_path)
    name = flag.split("=")[0]
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert proc.stderr == f"tfq {command}: {name} is a flag of {owners}, not of {command}; 'tfq {command} --help' " \
                          f"lists {command}'s flags.\n"
    assert list(tmp_path.iterdir()) == []


def test_no_tensorflow_startup_lines(files, tmp_path):
    """TensorFlow's C++ start-up lines (oneDNN, CUDA, CPU features) are hidden in the CLI, even without
    TF_CPP_MIN_LOG_LEVEL; the one line on stderr is tfq's calibration summary (none with --quiet)."""
    env = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = [sys.executable, "-m", "tfq.cli", "convert", f"--model={files / 'm.keras'}", f"--data={files / 'calib.npz'}",
            f"--output={tmp_path / 'm.tflite'}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[tfq] calibrated ") and " on 200 samples in " in lines[0], lines
    proc = subprocess.run(args + ["--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.startswith(f"wrote {tmp_path / 'm.tflite'}: ")
    # Library use: importing the CLI module sets nothing; only the entry point does.
    code = "import os, tfq.cli.commands; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout == "None\n"


# SIGINT arrives while the TFLite converter runs (the signal is sent from inside the converter call, so the
# test does not depend on timing): one line, status 130, no traceback and no output.
_INTERRUPTING = """
import os, signal, sys
from tfq.cli import commands
quiet_import = commands.import_tensorflow_quietly

def import_then_patch():
    quiet_import()
    import tfq.export.convert, tfq.tflite.converter
    original = tfq.tflite.converter.run_converter

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "run_converter", None) is original:
            module.run_converter = interrupted

commands.import_tensorflow_quietly = import_then_patch
sys.argv = ["tfq", *sys.argv[1:]]
commands.run()
"""


@pytest.mark.parametrize("command", ["convert", "tune"])
def test_sigint_is_one_line_status_130_and_no_output(files, tmp_path, command):
    if command == "convert":
        args = [f"--model={files / 'm.keras'}", f"--data={files / 'calib.npz'}", f"--output={tmp_path / 'm.tflite'}"]
    else:
        args = [f"--model={files / 'm.keras'}", f"--data={files / 'calib.npz'}", f"--eval_data={files / 'test.npz'}",
                "--max_trials=2", f"--output_dir={tmp_path / 'tuned'}"]
    proc = run("-c", _INTERRUPTING, command, *args, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == f"tfq {command}: interrupted" and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [], left  # no .tflite, no temporary file, no report


def test_interrupt_in_process_returns_130(monkeypatch, capsys):
    from absl import flags

    from tfq.cli import commands as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._HANDLERS, "inspect", interrupted)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tfq", "--tflite=x.tflite"])
    try:
        assert cli.main(["tfq", "inspect"]) == 130
    finally:
        flags.FLAGS.unparse_flags()
    assert capsys.readouterr().err == "tfq inspect: interrupted\n"


@pytest.mark.parametrize("script, args, message", [
    ("train_qat.py", ["--epochs=-1"], "train_qat: Expected --epochs >= 1. Received: --epochs=-1"),
    ("train_qat.py", ["--model=nothere.keras", "--data=train.npz"], "train_qat: model not found: 'nothere.keras'"),
    ("train_qat.py", ["--model=m.keras", "--data=cut.npz"], "train_qat: --data='cut.npz' is not a readable .npz file"),
    ("prune_and_quantize.py", ["--model=nothere.keras", "--data=train.npz"],
     "prune_and_quantize: model not found: 'nothere.keras'"),
    ("prune_and_quantize.py", ["--model=m.keras", "--data=cut.npz"],
     "prune_and_quantize: --data='cut.npz' is not a readable .npz file"),
])
def test_scripts_bad_input_is_one_line(files, tmp_path, script, args, message):
    shutil.copy(files / "m.keras", tmp_path / "m.keras")
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "train.npz").read_bytes()[:300])  # a truncated archive
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(str(SCRIPTS / script), *args, "--output_dir=qat_out" if script == "train_qat.py" else "--output=p.tflite",
               cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no model, no output directory

"""The ``tfq`` command: a thin absl layer over the library.

Usage::
    tfq quickstart [--output_dir=tfq_quickstart]
    tfq convert --model=m.keras --mode=int8 --data=calib.npz --calibration=kl --output=m.tflite
    tfq convert --model=m.keras --mode=int8 --data_free=on --equalize --bias_correction=analytical --output=m.tflite
    tfq convert --model=m.keras --data=calib.npz --method=weight_rounding=gptq --method=bias_correction --output=m.tflite
    tfq evaluate --model=float.keras --tflite=a.tflite,b.tflite --data=test.npz
    tfq inspect --tflite=m.tflite [--explain [--data=samples.npz]]
    tfq tune --model=m.keras --data=calib.npz --eval_data=val.npz --max_drop=0.005 --output_dir=out

``.npz`` files hold ``x`` (inputs) and optionally ``y`` (labels). ``tfq <command> --help`` lists
the command's flags; ``tfq --version`` prints the version.
"""

from __future__ import annotations

import collections
import os
import sys
import zipfile
from pathlib import Path

from absl import app, flags

from tfq.cli.flags import (
    UsageError,
    help_requested,
    import_tensorflow_quietly,
    interrupted,
    load_npz,
    print_command_help,
    print_version,
    quiet_logs,
    quiet_tensorflow_environment,
    version_requested,
)
from tfq.cli.quickstart import run_quickstart
from tfq.core.calibration_methods import DEFAULT_CALIBRATION, calibration_method_names
from tfq.core.export_modes import export_mode_names, io_dtype_names
from tfq.core.fileio import check_writable, check_writable_dir
from tfq.core.logs import command_line_output
from tfq.reference import explain_table

__all__ = ["main", "run", "COMMANDS"]

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Keras model: .keras/.h5 file or SavedModel directory.")
flags.DEFINE_string("mode", "int8", f"Export mode: {', '.join(export_mode_names())}.")
flags.DEFINE_string("data", None, ".npz with 'x' (and optionally 'y'): calibration data, or test data for evaluate.")
flags.DEFINE_string("eval_data", None, ".npz with 'x' and 'y': evaluation data for tune.")
flags.DEFINE_string("calibration", DEFAULT_CALIBRATION, f"Calibration: {', '.join(calibration_method_names())} "
                    f"({DEFAULT_CALIBRATION}: MinMax, samples far outside the rest set aside).")
flags.DEFINE_float("percentile", None, "Percentile for --calibration=percentile (e.g. 99.99).")
flags.DEFINE_string("recipe", None, "Recipe preset name or .yaml/.json file (overrides --mode etc.).")
flags.DEFINE_string("io_dtype", "float32", f"Model input/output type: {', '.join(io_dtype_names())}.")
flags.DEFINE_list("float_layers", [], "Comma-separated layer names/regexes kept float (for a SavedModel or float "
                  ".tflite: op types such as DIV, or tensor names).")
flags.DEFINE_list("int16_layers", [], "SavedModel or float .tflite: comma-separated op types or tensor names "
                  "computed with int16 activations.")
flags.DEFINE_boolean("per_channel", True, "Per-channel conv weight scales.")
flags.DEFINE_integer("num_samples", None, "Cap on calibration samples.")
flags.DEFINE_string("output", None, "Output .tflite path (convert).")
flags.DEFINE_string("output_dir", None, "Output directory (quickstart, tune).")
flags.DEFINE_list("tflite", [], "Comma-separated .tflite files (evaluate, inspect).")
flags.DEFINE_integer("num_threads", None, "Interpreter threads (default: one per CPU core).")
flags.DEFINE_integer("max_samples", None, "Cap on evaluation samples.")
flags.DEFINE_float("max_drop", 0.01, "Tune: largest accepted metric drop vs float.")
flags.DEFINE_string("objective", "size", "Tune: size or latency.")
flags.DEFINE_string("strategy", "sensitivity", "Tune: sensitivity, random or bayesian.")
flags.DEFINE_integer("max_trials", 20, "Tune: trial budget.")
flags.DEFINE_integer("epochs", 10, "Quickstart: float training epochs.")
flags.DEFINE_integer("qat_epochs", 2, "Quickstart: QAT fine-tuning epochs.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_boolean("quiet", False, "Less output.")
flags.DEFINE_boolean("explain", False, "Inspect: print each op's integer arithmetic (scales, M0·2^-n, "
                     "int32 accumulator bounds; with --data, observed accumulators and saturation).")
flags.DEFINE_boolean("equalize", None, "Convert: cross-layer equalization and high-bias absorption first.")
flags.DEFINE_string("bias_correction", None, "Convert: bias correction: off, on, empirical or analytical.")
flags.DEFINE_string("weight_rounding", None, "Convert: nearest, adaround or gptq.")
flags.DEFINE_string("data_free", None, "Convert: off, on, synthetic or bn_statistics (no --data).")
flags.DEFINE_multi_string("method", [], "Convert: a registered post-training method (tfq.ptq_methods), repeatable: "
                          "name (on), name=value, or name[=value]:option=value,option=value.")

COMMANDS = ("quickstart", "convert", "evaluate", "inspect", "tune")

# What each command does (its --help) and the flags it reads; any other tfq flag is refused.
COMMAND_SUMMARY = {
    "quickstart": "train a small CNN on the packaged digits, export every variant and compare them",
    "convert": "convert a Keras model (.keras, .h5 or SavedModel) to a .tflite file",
    "evaluate": "run Keras and TFLite models on the same data and compare them",
    "inspect": "describe .tflite files: ops, tensors, quantization (--explain: the integer arithmetic)",
    "tune": "search for the smallest (or fastest) model within an accuracy drop",
}
COMMON_FLAGS = ("quiet",)
COMMAND_FLAGS = {
    "quickstart": ("output_dir", "epochs", "qat_epochs", "seed"),
    "convert": ("model", "mode", "data", "calibration", "percentile", "recipe", "io_dtype", "float_layers",
                "int16_layers", "per_channel", "num_samples", "output", "equalize", "bias_correction",
                "weight_rounding", "data_free"),
    "evaluate": ("model", "tflite", "data", "num_threads", "max_samples", "output"),
    "inspect": ("tflite", "explain", "data"),
    "tune": ("model", "data", "eval_data", "max_drop", "objective", "strategy", "max_trials", "seed", "output_dir"),
}
# A flag missing from COMMAND_FLAGS belongs to the command its help text starts with ("Convert: …").
_HELP_PREFIX = {f"{command.capitalize()}:": command for command in COMMANDS}


def flags_of(command: str) -> list[str]:
    """The names of the flags ``command`` reads, in the order they are defined."""
    names = []
    for flag in FLAGS.get_flags_for_module(__name__):
        listed = [c for c, names_of in COMMAND_FLAGS.items() if flag.name in names_of]
        owners = listed or [c for prefix, c in _HELP_PREFIX.items() if (flag.help or "").startswith(prefix)]
        if flag.name in COMMON_FLAGS or command in owners or not owners:
            names.append(flag.name)
    return names


def _owners(name: str) -> list[str]:
    return [c for c in COMMANDS if name in flags_of(c)]


def _check_flags(command: str) -> None:
    """Refuses, in one line, a flag given on the command line that ``command`` does not read."""
    mine = set(flags_of(command))
    for flag in FLAGS.get_flags_for_module(__name__):
        if flag.present and flag.name not in mine:
            owners = _owners(flag.name)
            raise UsageError(f"--{flag.name} is a flag of {' and '.join(owners)}, not of {command}; "
                             f"'tfq {command} --help' lists {command}'s flags.")

_SWITCH = {"off": False, "false": False, "no": False, "on": True, "true": True, "yes": True}


def _switch(value):
    """A flag that is on/off or a method name: "on"/"off" become True/False; None stays None."""
    if value is None:
        return None
    return _SWITCH.get(value.lower(), value)


def _scalar(text: str):
    """A flag value: on/off/true/false/yes/no as a bool, an int, a float, else the string."""
    if text.lower() in _SWITCH:
        return _SWITCH[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_flag(text: str) -> tuple[str, object]:
    """``--method`` as ``(name, setting)``: ``name`` (on), ``name=value``, ``name[=value]:opt=v,opt=v``.

    ``--method=name`` switches the method on with the first value after its off value.

    The setting is validated by the method's registry entry when the recipe is built.

    Example:
        >>> method_flag("weight_rounding=gptq"), method_flag("clip:k=2.5")
        (('weight_rounding', 'gptq'), ('clip', {'k': 2.5}))
    """
    head, _, tail = text.partition(":")
    name, has_value, value = head.partition("=")
    if not name.isidentifier():
        raise UsageError(f"--method takes name, name=value or name[=value]:option=value,... Received: --method={text}")
    options = {}
    for item in filter(None, tail.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.isidentifier():
            raise UsageError(f"--method options are option=value, separated by commas. Received: --method={text}")
        options[key] = _scalar(raw)
    if not options:
        return name, _scalar(value) if has_value else {}  # {}: on, with the method's first "on" value
    return name, ({"value": _scalar(value)} if has_value else {}) | options


def model_keys(paths) -> list[str]:
    """Report names for model files, one per file and all distinct.

    A file is named by its stem; files sharing a stem (``m.keras`` and ``m.tflite``) by their file
    name; files sharing a name in different folders by their path as given; the same path given
    twice gets `` #2``, `` #3`` …, so no file is dropped and no model is compared with itself
    under another's name.

    Example:
        >>> model_keys(["m.keras", "m.tflite", "a/q.tflite", "b/q.tflite", "x.tflite"])
        ['m.keras', 'm.tflite', 'a/q.tflite', 'b/q.tflite', 'x']
    """
    paths = [Path(p) for p in paths]
    keys = [p.stem for p in paths]
    for wider in (lambda p: p.name, lambda p: str(p)):
        counts = collections.Counter(keys)
        keys = [wider(p) if counts[k] > 1 else k for p, k in zip(paths, keys)]
    seen: collections.Counter = collections.Counter()
    unique = []
    for key in keys:
        seen[key] += 1
        unique.append(key if seen[key] == 1 else f"{key} #{seen[key]}")
    return unique


def _convert() -> int:
    from tfq.export.convert import convert
    from tfq.tflite.info import inspect_tflite

    if not FLAGS.model:
        raise UsageError("--model is required (a .keras file, SavedModel directory or float .tflite).")
    if not FLAGS.output:
        raise UsageError("--output is required (where to write the .tflite).")
    check_writable(FLAGS.output, "--output")
    data = load_npz(FLAGS.data, "data")[0] if FLAGS.data else None
    params = {"percentile": FLAGS.percentile} if FLAGS.percentile is not None else None
    methods = dict(method_flag(text) for text in FLAGS.method)
    content = convert(
        FLAGS.model, None if FLAGS.recipe else FLAGS.mode, data, recipe=FLAGS.recipe,
        calibration=FLAGS.calibration, per_channel=FLAGS.per_channel, io_dtype=FLAGS.io_dtype,
        float_layers=FLAGS.float_layers, int16_layers=FLAGS.int16_layers, num_calibration_samples=FLAGS.num_samples,
        output=FLAGS.output,
        calibration_params=params, verbose=not FLAGS.quiet, equalize=FLAGS.equalize,
        bias_correction=_switch(FLAGS.bias_correction), weight_rounding=FLAGS.weight_rounding,
        data_free=_switch(FLAGS.data_free), methods=methods,
    )
    info = inspect_tflite(content)
    print(f"wrote {FLAGS.output}: {len(content):,} bytes, {len(info.ops)} ops, {info.num_float_ops} float ops, "
          f"inputs {info.input_dtypes}")
    return 0


def _evaluate() -> int:
    from tfq.analysis.evaluation import evaluate

    if not FLAGS.model and not FLAGS.tflite:
        raise UsageError("give --model and/or --tflite=a.tflite,b.tflite to evaluate.")
    if FLAGS.output:
        check_writable(FLAGS.output, "--output")
    x, y = load_npz(FLAGS.data, "data")
    paths = ([FLAGS.model] if FLAGS.model else []) + list(FLAGS.tflite)
    models = {}
    for i, (key, path) in enumerate(zip(model_keys(paths), paths)):
        if i == 0 and FLAGS.model:
            from tfq.models.interop import load_keras_model

            models[key] = load_keras_model(path, where="--model")
        else:
            models[key] = path
    report = evaluate(models, x, y, num_threads=FLAGS.num_threads, max_samples=FLAGS.max_samples,
                      verbose=not FLAGS.quiet)
    print(report.to_markdown())
    if FLAGS.output:
        report.to_json(FLAGS.output)
    return 0


def _inspect() -> int:
    from tfq.tflite.info import inspect_tflite

    if not FLAGS.tflite:
        raise UsageError("--tflite=model.tflite is required.")
    if FLAGS.data and not FLAGS.explain:
        raise UsageError("inspect reads --data only with --explain (to observe accumulators and saturation).")
    data = load_npz(FLAGS.data, "data")[0] if FLAGS.explain and FLAGS.data else None
    for path in FLAGS.tflite:
        print(f"# {path}")
        print(inspect_tflite(path).summary())
        if FLAGS.explain:
            print(explain_table(path, inputs=data))
    return 0


def _quickstart() -> int:
    check_writable_dir(FLAGS.output_dir or "tfq_quickstart", "--output_dir")
    report = run_quickstart(output_dir=FLAGS.output_dir or "tfq_quickstart", epochs=FLAGS.epochs,
                            qat_epochs=FLAGS.qat_epochs, seed=FLAGS.seed, verbose=not FLAGS.quiet)
    print(report.to_markdown())
    return 0


def _tune() -> int:
    from tfq.analysis.tuning import tune

    if not FLAGS.model:
        raise UsageError("--model is required.")
    if FLAGS.output_dir:
        check_writable_dir(FLAGS.output_dir, "--output_dir")
    x_cal, _ = load_npz(FLAGS.data, "data")
    x_val, y_val = load_npz(FLAGS.eval_data, "eval_data", need_labels=True)
    result = tune(FLAGS.model, x_cal, x_val, y_val, max_drop=FLAGS.max_drop, objective=FLAGS.objective,
                      strategy=FLAGS.strategy, max_trials=FLAGS.max_trials, seed=FLAGS.seed,
                      output_dir=FLAGS.output_dir, verbose=not FLAGS.quiet)
    print(result.summary())
    if FLAGS.output_dir:
        result.save(FLAGS.output_dir)
    return 0 if result.met else 1


_HANDLERS = {"quickstart": _quickstart, "convert": _convert, "evaluate": _evaluate, "inspect": _inspect,
             "tune": _tune}


def main(argv) -> int:
    """Runs ``argv[1]`` (a command) with the parsed flags: 0 on success, 1 on a failure while working,
    2 on bad input, 130 when interrupted (SIGINT); every failure is one line on stderr."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        print(f"tfq: expected a command, one of {', '.join(COMMANDS)}; received {got!r}. "
              f"Run 'tfq --help' for the commands.", file=sys.stderr)
        return 2
    if len(argv) > 2:
        print(f"tfq: unexpected arguments {argv[2:]}; flags take the form --name=value.", file=sys.stderr)
        return 2
    try:
        _check_flags(argv[1])
        if argv[1] != "inspect":  # inspect reads .tflite files with LiteRT alone
            import_tensorflow_quietly()
        quiet_logs()
        return _HANDLERS[argv[1]]()
    except KeyboardInterrupt:
        # Outputs are written atomically: nothing partial is left (tune keeps its trial log to resume).
        print(f"tfq {argv[1]}: interrupted{_resume_hint(argv[1])}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped early (``tfq inspect m.tflite | head``): silent, as other Unix tools are.
        return _stdout_closed()
    except (ValueError, TypeError, LookupError, ImportError, zipfile.BadZipFile, OSError) as err:
        # Bad input (values, files, archives): status 2. An I/O failure while working: status 1.
        status = 1 if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) else 2
        print(f"tfq {argv[1]}: {_one_line(err)}", file=sys.stderr)
        return status


def _stdout_closed() -> int:
    """Points stdout at the null device, so the final flush at exit cannot fail again, and returns
    141 (128 + SIGPIPE), the status a shell gives a Unix tool whose reader went away."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _resume_hint(command: str) -> str:
    log = Path(FLAGS.output_dir) / "trials.jsonl" if command == "tune" and FLAGS.output_dir else None
    return f" (trials so far in {log}: the same command resumes)" if log is not None and log.exists() else ""


def _one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError as its strerror and file name)."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        text = f"{err.strerror}: {err.filename!r}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:599] + "…"


def run_command(command: str | None = None, doc: str | None = None) -> None:
    """Entry point for ``tfq`` (``command=None``) and the scripts that wrap one command."""
    quiet_tensorflow_environment()
    command_line_output()
    if version_requested():
        print_version()
        sys.exit(0)
    if help_requested():
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        shown = command or (args[0] if args else None)
        if shown is not None and shown not in COMMANDS:
            print(f"tfq: expected a command, one of {', '.join(COMMANDS)}; received {shown!r}.", file=sys.stderr)
            sys.exit(2)
        print_command_help(doc or __doc__, shown, COMMAND_SUMMARY, [FLAGS[n] for n in flags_of(shown)] if shown
                           else [FLAGS[n] for n in COMMON_FLAGS], script=command is not None)
        sys.exit(0)
    prefix = [command] if command else []

    def run_main(argv):
        status = main([argv[0], *prefix, *argv[1:]])
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            status = _stdout_closed()
        if status == 130:  # main() printed "interrupted"; TensorFlow's C++ code may have seen the signal too
            interrupted_exit()
        sys.exit(status)

    try:
        app.run(run_main)
    except KeyboardInterrupt:  # before main() runs (flag parsing): nothing started
        interrupted(f"tfq{' ' + command if command else ''}")


def interrupted_exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def run() -> None:
    """Console-script entry point."""
    run_command()


if __name__ == "__main__":
    run()

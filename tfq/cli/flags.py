"""Helpers for tfq's absl programs (the ``tfq`` command and ``scripts/``); defines no flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

from tfq.core.logs import command_line_output

__all__ = ["UsageError", "help_requested", "import_tensorflow_quietly", "load_npz", "print_command_help", "print_help",
           "print_version", "interrupted", "quiet_logs", "quiet_tensorflow_environment", "run_script", "version_requested"]


class UsageError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


def load_npz(path: str | None, what: str, need_labels: bool = False):
    """Reads ``x`` (and ``y``) from an .npz file, or ``x`` alone from an .npy file.

    Every failure is a one-line :class:`UsageError` naming the flag and the file: a missing file,
    a directory, a corrupt or truncated archive, a text or pickled file, an archive without ``x``.
    """
    import zipfile

    import numpy as np

    if not path:
        raise UsageError(f"--{what} is required: an .npz file with 'x'{' and y' if need_labels else ''}.")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--{what} file not found: {path!r}")
    if not p.is_file():
        raise UsageError(f"--{what}={path!r} is a directory; give an .npz file (np.savez(path, x=..., y=...)).")
    hint = "save it with np.savez(path, x=..., y=...)"
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PK"):
            with np.load(p, allow_pickle=False) as f:
                keys = list(f.keys())
                if "x" not in keys:
                    raise UsageError(f"--{what}={path!r} has no array 'x' (found {keys}); {hint}.")
                x = f["x"]
                y = f["y"] if "y" in keys else None
        elif magic == b"\x93NUMPY":
            x, y = np.load(p, allow_pickle=False), None
        else:
            raise UsageError(f"--{what}={path!r} is not an .npz (or .npy) file: it looks like "
                             f"{'text' if magic.isascii() else 'another binary format'}; {hint}.")
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise UsageError(f"--{what}={path!r} is not a readable .npz file ({detail}); the file is corrupt or "
                         f"truncated: {hint}.") from None
    if need_labels and y is None:
        raise UsageError(f"--{what}={path!r} has no labels 'y'; they are needed here ({hint}).")
    return x, y


def quiet_logs() -> None:
    """absl.app turns INFO logging on; TF's SavedModel export would then flood the terminal."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def quiet_tensorflow_environment() -> None:
    """Environment for a quiet TensorFlow start, set by the command-line entry points only (never on
    ``import tfq``: a program's own settings are its own). A value the user set is kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO, WARNING and ERROR logs
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with file descriptor 2 set aside, in the command-line entry points only.

    TensorFlow's shared libraries log (oneDNN, CUDA, CPU features) through absl's C++ logging
    before they read ``TF_CPP_MIN_LOG_LEVEL``, so the variable alone does not hide those lines. They
    are dropped, unless the user asked for C++ logs (``TF_CPP_MIN_LOG_LEVEL`` below 3); if the import
    fails, what it wrote is shown.
    """
    quiet_tensorflow_environment()
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except Exception:  # not KeyboardInterrupt: an interrupted start has nothing to show
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))
                sys.stderr.flush()


def help_requested() -> bool:
    return any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:])


def version_requested() -> bool:
    return "--version" in sys.argv[1:]


def print_version() -> None:
    """``tfq <version>``: the version tfq/__init__.py holds (the package is loaded whenever this module is)."""
    print(f"tfq {sys.modules[__name__.split('.')[0]].__version__}")


def _flag_line(flag) -> str:
    """``--name: help`` and its default, as absl's help lays them out."""
    import textwrap

    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = flag.default
    if isinstance(default, list):
        default = ",".join(str(v) for v in default)
    shown = "none" if default is None else (str(default).lower() if isinstance(default, bool) else repr(default))
    body = textwrap.fill(f"{name}: {flag.help}", width=100, initial_indent="  ", subsequent_indent="    ")
    return f"{body}\n    (default: {shown})"


def print_command_help(doc: str, command: str | None, summaries: dict, command_flags, script: bool = False) -> None:
    """Help for one command (its summary, usage and flags) or, with ``command=None``, the list of commands.

    ``doc`` is the program's docstring: a script that wraps one command prints it whole; ``tfq <command>``
    prints its usage lines from it.
    """
    lines = doc.strip().splitlines()
    if command is None:
        print(f"tfq {sys.modules[__name__.split('.')[0]].__version__}: quantize Keras models to fully integer "
              f"TFLite (PTQ and QAT), evaluate and tune them.")
        print("\nusage: tfq <command> [--flag=value ...]\n\ncommands:")
        for name, summary in summaries.items():
            print(f"  {name:<11} {summary}")
        print("\n'tfq <command> --help' lists a command's flags; 'tfq --version' prints the version.")
    elif script:
        print(doc.strip())
    else:
        print(f"tfq {command}: {summaries[command]}\n\nusage:")
        for line in lines:
            if line.strip().startswith(f"tfq {command} ") or line.strip() == f"tfq {command}":
                print(f"    {line.strip()}")
    print("\nflags:")
    for flag in command_flags:
        print(_flag_line(flag))


def print_help(doc: str, module) -> None:
    """Prints ``doc`` and the flags ``module`` defines (absl's --help lists only the main module's)."""
    print(doc.strip())
    print("\nflags:")
    print(flags.FLAGS.module_help(module))


def run_script(main_fn, doc: str) -> None:
    """Entry point for a script with its own flags: ``--help`` lists them, then ``app.run(main_fn)``.

    TensorFlow starts without its C++ start-up lines; bad input (a :class:`UsageError`, a missing or
    unreadable file) is one line on stderr and exit status 2; SIGINT is one line and status 130.
    """
    quiet_tensorflow_environment()
    command_line_output()
    if help_requested():
        print_help(doc, sys.modules["__main__"])
        sys.exit(0)
    import zipfile

    name = Path(sys.argv[0]).stem

    def run_main(argv):
        try:
            import_tensorflow_quietly()
            return main_fn(argv)
        except KeyboardInterrupt:
            interrupted(name)
        except (ValueError, TypeError, LookupError, FileNotFoundError, zipfile.BadZipFile) as err:
            # Bad input (a flag's value, a missing or unreadable file): one line, status 2.
            text = " ".join(str(err).split()) or type(err).__name__
            print(f"{name}: {text if len(text) <= 600 else text[:599] + '…'}", file=sys.stderr)
            sys.exit(2)

    try:
        app.run(run_main)
    except KeyboardInterrupt:
        interrupted(name)


def interrupted(name: str) -> None:
    """SIGINT: one line and exit status 130 at once (TensorFlow's C++ code may have seen the signal too).
    Outputs are written atomically, so nothing partial is left."""
    print(f"{name}: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)

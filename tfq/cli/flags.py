"""Helpers for tfq's absl programs (the ``tfq`` command and ``scripts/``); defines no flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

__all__ = ["UsageError", "help_requested", "load_npz", "print_help", "quiet_logs", "run_script"]


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


def help_requested() -> bool:
    return any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:])


def print_help(doc: str, module) -> None:
    """Prints ``doc`` and the flags ``module`` defines (absl's --help lists only the main module's)."""
    print(doc.strip())
    print("\nflags:")
    print(flags.FLAGS.module_help(module))


def run_script(main_fn, doc: str) -> None:
    """Entry point for a script with its own flags: ``--help`` lists them, then ``app.run(main_fn)``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if help_requested():
        print_help(doc, sys.modules["__main__"])
        sys.exit(0)
    app.run(main_fn)

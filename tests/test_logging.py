"""tfq's messages: the "tfq" logger, verbose=, Keras's interactive logging, progress on a terminal only."""

import ast
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import tfq
from tfq.core import logs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu", name="d1"),
                              keras.layers.Dense(3, name="d2")])
    x = np.random.default_rng(0).normal(size=(40, 6)).astype("float32")
    return model, x


@pytest.fixture
def clean_logger():
    """The "tfq" logger as a program that configured nothing finds it: the root logger without handlers
    (pytest's capture handlers, which its logging plugin adds for each test phase, set aside); restored afterwards."""

    class NoRootHandlers:
        def __enter__(self):
            self.saved = logging.getLogger().handlers[:]
            logging.getLogger().handlers[:] = []

        def __exit__(self, *exc):
            logging.getLogger().handlers[:] = self.saved

    level, propagate = logs.logger.level, logs.logger.propagate
    yield NoRootHandlers
    logs.logger.setLevel(level)
    logs.logger.propagate = propagate


def test_library_prints_nothing_itself():
    """Only the command line prints (its results, its help); the library's messages go through the logger."""
    allowed = {"tfq/cli/commands.py", "tfq/cli/flags.py",
               "tfq/tflite/sandbox.py"}  # the checker worker's protocol with its parent, on the worker's own stdout
    calls = []
    for path in sorted((REPO / "tfq").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and rel not in allowed:
                calls.append(f"{rel}:{node.lineno}")
    assert calls == [], calls


def test_verbose_prints_through_the_logger_on_stderr(small, clean_logger, capsys):
    model, x = small
    n = len(tfq.calibrate(model, x, "minmax").ranges)  # the tensors calibrated, counted from the result
    capsys.readouterr()
    with clean_logger():
        tfq.calibrate(model, x, "minmax", verbose=True)
        out, err = capsys.readouterr()
        assert out == ""  # no progress bar on stdout
        assert err.startswith(f"[tfq] calibrated {n} tensors (minmax) on 40 samples in ") and err.count("\n") == 1, err
        tfq.calibrate(model, x, "minmax")  # verbose=False: the logger's level (WARNING) holds
        assert capsys.readouterr() == ("", "")
    assert logs.logger.level == logging.NOTSET  # verbose=True restored the level


def test_program_routes_and_silences_tfq(small, clean_logger, capsys):
    model, x = small
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    with clean_logger():
        logging.getLogger().addHandler(handler)  # the program configured logging: its handlers get tfq's lines
        logs.logger.setLevel(logging.INFO)
        tfq.calibrate(model, x, "minmax")  # no verbose=: the program's INFO level is enough
        assert [r.name for r in records] == ["tfq"] and records[0].getMessage().startswith("calibrated ")
        assert capsys.readouterr().err == ""  # not printed twice
        records.clear()
        logs.logger.setLevel(logging.ERROR)
        tfq.calibrate(model, x, "minmax", verbose=True)  # verbose=True lowers it for the call, as asked
        assert len(records) == 1 and logs.logger.level == logging.ERROR


def test_keras_non_interactive_logging_is_respected(small, clean_logger, capsys):
    import keras

    model, x = small
    keras.utils.disable_interactive_logging()
    try:
        assert not logs.interactive()
        with clean_logger():
            tfq.calibrate(model, x, "minmax", verbose=True)
        assert capsys.readouterr() == ("", "")
        assert not logs.Progress("x", total=3, enabled=True).enabled
    finally:
        keras.utils.enable_interactive_logging()
    assert logs.interactive()


def _read_all(master: int, terminal) -> str:
    """Everything written to the pseudo-terminal: its slave closed first, so the read ends at EOF
    (one os.read may return before the last write reached the master)."""
    terminal.close()
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO on Linux once the slave is closed and the buffer is drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_progress_only_on_a_terminal(monkeypatch):
    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        with logs.Progress("calibrating", total=10, unit="samples", enabled=True, delay=0) as bar:
            bar.update(5)
            bar._last_draw = 0  # the next update draws at once
            bar.update(10)
        drawn = _read_all(master, terminal)
    finally:
        terminal.close()
        os.close(master)
    assert "\rcalibrating [" + "=" * 12 + "." * 12 + "] 5/10 samples 0 s" in drawn
    assert "] 10/10 samples" in drawn and drawn.endswith("\r\033[K")  # the line erased at the end
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe: nothing drawn
    with logs.Progress("calibrating", total=10, enabled=True, delay=0) as bar:
        bar.update(5)
    assert not bar.enabled and sys.stderr.getvalue() == ""


def test_progress_follows_the_logger_level_by_default(monkeypatch, clean_logger):
    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        logs.logger.setLevel(logging.WARNING)
        assert not logs.Progress("x").enabled
        with logs.verbosity(True):
            bar = logs.Progress("x")
            assert bar.enabled
            bar.close()
    finally:
        terminal.close()
        os.close(master)


def test_tune_trial_lines_carry_an_estimate_of_the_time_left():
    from tfq.analysis.tuning import _duration

    assert [_duration(s) for s in (4.4, 89, 150, 5399, 9000)] == ["4 s", "89 s", "2 min", "90 min", "2.5 h"]

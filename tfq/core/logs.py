"""tfq's messages: the ``"tfq"`` logger, ``verbose=`` switches, and progress lines on a terminal.

Every message the library prints goes through ``logging.getLogger("tfq")`` (INFO for progress,
WARNING for what the user should know), so a program routes or silences tfq like any library::

    logging.getLogger("tfq").setLevel(logging.ERROR)     # silence tfq
    logging.basicConfig(level=logging.INFO)              # tfq's messages through the program's handlers

While the program has configured no logging (the root logger has no handler), tfq's own handler
writes the messages to ``sys.stderr``. A ``verbose=True`` argument lowers the logger's level to
INFO for the duration of the call; ``verbose=False`` leaves the level as the program set it
(WARNING by default). Progress bars are drawn on ``sys.stderr`` only when it is a terminal and
Keras's interactive logging is on (``keras.utils.disable_interactive_logging()`` turns them off,
and tfq's own handler with them).

Example:
    >>> with verbosity(True):                     # doctest: +SKIP
    ...     logger.info("calibrating ...")        # printed: [tfq] calibrating ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

__all__ = ["logger", "verbosity", "Progress", "command_line_output", "interactive"]

logger = logging.getLogger("tfq")


def interactive() -> bool:
    """Whether Keras's interactive logging is on (True when Keras is not loaded: tfq does not load it here)."""
    keras = sys.modules.get("keras")
    check = getattr(getattr(keras, "utils", None), "is_interactive_logging_enabled", None)
    return True if check is None else bool(check())


class _DefaultHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` while the program has not configured logging itself."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("[tfq] %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current sys.stderr is used instead
        pass

    own_output = False  # set by the command-line entry points: tfq's lines are theirs to print

    def emit(self, record):
        if (logging.getLogger().handlers and not self.own_output) or not interactive():
            return  # the program's handlers get it by propagation; Keras's non-interactive mode: no printing
        Progress.clear_line()
        super().emit(record)


if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
    logger.addHandler(_DefaultHandler())


def command_line_output() -> None:
    """For a command-line program (the ``tfq`` command, ``scripts/``): tfq's messages are printed by
    tfq's handler as ``[tfq] message`` on stderr, not by the handler absl.app puts on the root logger."""
    logger.propagate = False
    for handler in logger.handlers:
        if isinstance(handler, _DefaultHandler):
            handler.own_output = True


@contextlib.contextmanager
def verbosity(verbose):
    """``verbose=True``: the ``"tfq"`` logger at INFO (at least) inside the block; otherwise unchanged.

    Example:
        >>> with verbosity(True):              # doctest: +SKIP
        ...     logger.info("shown")
    """
    if not verbose or logger.getEffectiveLevel() <= logging.INFO:
        yield
        return
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


class Progress:
    """A progress line on ``sys.stderr`` for work that takes more than ``delay`` seconds.

    Drawn only on a terminal, with ``enabled`` true and Keras's interactive logging on; never on a
    file or a pipe (a log keeps the INFO line the caller writes when the work ends). ``total=None``
    shows the elapsed time only (a ticker thread redraws it every second: a converter call gives no
    intermediate steps).

    Example:
        >>> with Progress("calibrating", total=300, unit="samples", enabled=True) as bar:  # doctest: +SKIP
        ...     bar.update(32)   # 32 samples done
    """

    _active = None  # the Progress drawing now: a log line clears it first
    _lock = threading.Lock()

    def __init__(self, label: str, total: int | None = None, unit: str = "", enabled: bool | None = None,
                 delay: float = 2.0, width: int = 24):
        self.label, self.total, self.unit, self.delay, self.width = label, total, unit, delay, width
        if enabled is None:  # as the "tfq" logger's level says (verbosity(True) turns it on)
            enabled = logger.isEnabledFor(logging.INFO)
        self.enabled = bool(enabled) and interactive() and _is_terminal(sys.stderr)
        # The terminal's own descriptor: a converter call redirects descriptor 2 while it runs.
        self._fd = os.dup(sys.stderr.fileno()) if self.enabled else None
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._stop = threading.Event()
        self._ticker = None

    def __enter__(self):
        if self.enabled and self.total is None:
            self._ticker = threading.Thread(target=self._tick, name="tfq-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _tick(self):
        while not self._stop.wait(1.0):
            self._draw(force=True)

    def update(self, current: int) -> None:
        """Sets the amount done so far (as ``keras.utils.Progbar.update``)."""
        self.done = current
        if self.enabled:
            self._draw()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.total:
            share = min(self.done / self.total, 1.0)
            filled = int(round(share * self.width))
            return (f"{self.label} [{'=' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
                    f"{' ' + self.unit if self.unit else ''} {elapsed:.0f} s")
        return f"{self.label} ... {elapsed:.0f} s"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.start < self.delay or (not force and now - self._last_draw < 0.1):
            return
        with Progress._lock:
            if self._stop.is_set():
                return
            self._last_draw = now
            Progress._active = self
            self._write("\r" + self.line() + "\033[K")

    def _write(self, text: str) -> None:
        try:
            os.write(self._fd, text.encode("utf-8", "replace"))
        except OSError:  # the terminal went away: no more progress
            self.enabled = False

    @classmethod
    def clear_line(cls) -> None:
        """Erases the progress line being drawn (before a log line is written)."""
        with cls._lock:
            if cls._active is not None:
                cls._active._write("\r\033[K")
                cls._active = None

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with Progress._lock:
            if Progress._active is self:
                self._write("\r\033[K")
                Progress._active = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False

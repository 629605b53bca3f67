"""``python -m tfq.cli``: the ``tfq`` command."""

from tfq.cli.commands import run

run()

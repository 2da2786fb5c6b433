"""What the commands print: the INFO records of our own loggers (`ttte2e.*`, one per module) as
plain lines on standard output. Libraries keep their own logging settings."""

from __future__ import annotations

import logging
import sys


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (a test's capture, a Ray
    worker's redirected stream), not the stream of the moment it was made."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(prefix: str = "") -> None:
    """Our loggers' INFO records on stdout, each line after `prefix` (a sweep names its trial);
    calling it again replaces the handler it installed before."""
    logger = logging.getLogger("ttte2e")
    logger.setLevel(logging.INFO)
    # not again through the root logger: a Ray worker's root handler would print every line twice
    logger.propagate = False
    for handler in [h for h in logger.handlers if isinstance(h, _CurrentStdout)]:
        logger.removeHandler(handler)
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    logger.addHandler(handler)

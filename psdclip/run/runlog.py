"""What the console shows also goes into the run's log file (Hydra's ``<run folder>/<job name>.log``).

Text printed for people (tables, one-line errors, the rich progress bar's figures) is written to that file through the
``psdclip.log_file`` logger, which ``conf/hydra/default.yaml`` sends to the file handler only, so the console does not
show it twice. Outside Hydra the logger propagates like any other. This module imports nothing heavy (``psdclip.run.cli``
uses it before torch loads).
"""

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator

FILE_ONLY = "psdclip.log_file"
file_log = logging.getLogger(FILE_ONLY)


def announce(text: str, error: bool = False) -> None:
    """Print ``text`` (to stderr when ``error``) and write it to the run's log file."""
    print(text, file=sys.stderr if error else sys.stdout)
    file_log.log(logging.ERROR if error else logging.INFO, text)


class Progress:
    """Log lines for a long step that has no progress bar (writing shards, encoding an evaluation set): how far it is
    at most every ``every_s`` seconds, and a last line with the time taken."""

    def __init__(
        self, logger: logging.Logger, what: str, total: int | None = None, unit: str = "images", every_s: float = 10.0
    ):
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, total, unit, every_s
        self.count, self.started = 0, time.perf_counter()
        self.last_report = self.started

    def track(self, items: Iterable, size: Callable = lambda item: 1) -> Iterator:
        """Yield ``items``, counting ``size(item)`` of each; the last line once they are exhausted."""
        for item in items:
            yield item
            self.update(size(item))
        self.done()

    def update(self, added: int) -> None:
        self.count += added
        now = time.perf_counter()
        if now - self.last_report >= self.every_s:
            self.last_report = now
            of_total = f" of {self.total:,}" if self.total else ""
            self.logger.info(
                "%s: %s%s %s (%.0f s)", self.what, f"{self.count:,}", of_total, self.unit, now - self.started
            )

    def done(self) -> None:
        self.logger.info(
            "%s: %s %s in %.1f s", self.what, f"{self.count:,}", self.unit, time.perf_counter() - self.started
        )

"""What the console shows also goes into the run's log file (Hydra's ``<run folder>/<job name>.log``).

Text printed for people (tables, one-line errors, the rich progress bar's figures) is written to that file through the
``psdclip.log_file`` logger, which ``conf/hydra/default.yaml`` sends to the file handler only, so the console does not
show it twice. Outside Hydra the logger propagates like any other. This module imports nothing heavy (``psdclip.cli``
uses it before torch loads).
"""

import logging
import sys

FILE_ONLY = "psdclip.log_file"
file_log = logging.getLogger(FILE_ONLY)


def announce(text: str, error: bool = False) -> None:
    """Print ``text`` (to stderr when ``error``) and write it to the run's log file."""
    print(text, file=sys.stderr if error else sys.stdout)
    file_log.log(logging.ERROR if error else logging.INFO, text)

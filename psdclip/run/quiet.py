"""Start-up messages of the libraries we use that tell a psdclip user nothing, silenced with logging filters and
``warnings`` filters on their exact messages (everything else those libraries say still shows)."""

import logging
import warnings
from pathlib import Path

import open_clip

OPEN_CLIP_DIR = str(Path(open_clip.__file__).resolve().parent)

# (logger, message start) of records dropped; every one is a fact psdclip states itself or one that does not apply
DROPPED = (
    # psdclip builds models without pretrained weights on purpose (training from scratch, or loading its own
    # checkpoint right after), so this warning is wrong where it appears
    ("root", "No pretrained weights loaded"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip"),  # advertisements for Lightning's cloud services
)
WARNINGS = (
    # Lightning's own code calls torch's deprecated pytree API: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # psdclip's shard streams split shards across ranks and workers themselves (psdclip.data.plan), so the length
    # Lightning warns about is exact
    r"Your `IterableDataset` has `__len__` defined",
    # a mid-epoch resume does restore the stream position: the data module's state_dict holds it (Lightning's
    # check looks only at the loader, whose own state Lightning would restore too late for a run whose LR schedule
    # asks for the step count before the checkpoint is loaded)
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


class QuietFilter(logging.Filter):
    """Drops open_clip's INFO lines (11 per model build: which config and tokenizer it found) and ``DROPPED``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.pathname.startswith(OPEN_CLIP_DIR):
            return False
        message = record.getMessage()
        return not any(record.name == name and message.startswith(start) for name, start in DROPPED)


QUIET = QuietFilter()


def quiet_libraries() -> None:
    """Install the filters (idempotent). open_clip logs through the root logger, so the filter sits on it (a
    logger's filters see the records logged to that logger) and on Lightning's rank-zero logger."""
    for name in {name for name, _ in DROPPED}:
        logger = logging.getLogger(None if name == "root" else name)
        if QUIET not in logger.filters:
            logger.addFilter(QUIET)
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # Lightning gives its top logger a console handler of its own when imported; where Hydra (or any set-up) has
    # already given the root logger handlers, its records reach them too and would be printed twice
    if logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            lightning.removeHandler(handler)

"""Logging for fedchat's processes: one concise format, our loggers only.

Every fedchat logger is "fedchat" or "fedchat.<part>" (fedchat.node, fedchat.coordinator, fedchat.serve, ...),
so the one handler on "fedchat" prints them all.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, quiet_flower: bool = False) -> None:
    """Attach one stderr handler to the 'fedchat' logger (idempotent)."""
    logger = logging.getLogger("fedchat")
    logger.setLevel(level)
    if not any(getattr(h, "_fedchat", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        handler._fedchat = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    from flwr.supercore.logger import update_console_handler  # importing it configures Flower's logger

    flower = logging.getLogger("flwr")
    flower.propagate = False  # Ray workers' root handlers would print Flower's DEBUG lines again
    if quiet_flower:
        flower.setLevel(logging.WARNING)
        update_console_handler(level=logging.WARNING)
    quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Deprecation chatter from transformers/peft/opacus/ray is not the user's business."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

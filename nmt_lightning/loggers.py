"""Loggers: Weights & Biases that falls back to offline mode when it cannot log in."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_credentials_available() -> bool:
    """True when wandb has an API key (environment or ~/.netrc, as 'wandb login' writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLoggerOfflineFallback(WandbLogger):
    """``WandbLogger`` that records offline (``wandb sync`` uploads later) when no credentials
    are set up or ``WANDB_MODE=offline``; it never blocks a run waiting for the network."""

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
            if offline:
                log.warning("wandb: no credentials found, logging offline (upload later with 'wandb sync')")
        super().__init__(*args, offline=offline, **kwargs)

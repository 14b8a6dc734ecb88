"""Every checkpoint says which run wrote it: its result settings, their digest, its split and config files.

A resume compares them with its own before it touches the run dir (tlexp/runs.py), so a changed
setting is refused instead of mixing two runs into one record; a refused run puts the run dir's
``.hydra`` files (which Hydra rewrote at start) back as they were.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback

CHECKPOINT_KEY = "tlexp_run"


class RunIdentity(Callback):
    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.identity

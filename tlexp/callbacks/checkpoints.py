"""ModelCheckpoint for a run dir that may have been moved or copied before it is resumed.

Lightning keeps a checkpoint callback's record of its best checkpoints only when the folder is the
same string as before; after a move it forgets them, so the first epoch after the resume replaces
``best.ckpt`` whatever its score (the file then disagrees with the run's best epoch). Here a saved
path is re-rooted to the folder the run is in now when that folder holds the file (the run dir was
moved or copied); a checkpoint of another run (``ckpt_path=`` into another folder) keeps its paths,
so its best checkpoint is still the one tested if the resumed epochs do not beat it.
"""

from __future__ import annotations

import os

from pytorch_lightning.callbacks import ModelCheckpoint

PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RunDirCheckpoint(ModelCheckpoint):
    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def moved(path):
                here = self.dirpath + path[len(old):] if path and path.startswith(old) else path
                return here if here and os.path.exists(here) else path

            state_dict = {
                **state_dict, "dirpath": self.dirpath, **{k: moved(state_dict.get(k)) for k in PATH_KEYS if k in state_dict},
                "best_k_models": {moved(p): score for p, score in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)

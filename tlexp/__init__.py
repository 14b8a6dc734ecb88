"""tlexp: transfer-learning experiments for image classification.

Library use (examples/own_trainer.py)::

    cfg = tlexp.compose("data.root=photos", "model=resnet18", "strategy=blocks_1")
    data = tlexp.ImageDataModule.from_config(cfg)
    model = tlexp.TransferModule.from_config(cfg, data)
    phases = tlexp.PhasedFinetuning.from_config(cfg, model)
    pl.Trainer(max_epochs=phases.epochs, callbacks=[phases]).fit(model, datamodule=data)

Names resolve on first use, so ``import tlexp`` (and the CLIs that only read results) stay fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "compose": "tlexp.hydra_config",
    "ImageDataModule": "tlexp.data.datamodule",
    "TransferModule": "tlexp.model.module",
    "PhasedFinetuning": "tlexp.model.finetune",
    "FrozenPrefixCache": "tlexp.features.cache",
    "FocalLoss": "tlexp.model.losses",
}
__all__ = ["FocalLoss", "FrozenPrefixCache", "ImageDataModule", "PhasedFinetuning", "TransferModule", "__version__", "compose"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tlexp' has no attribute {name!r}")

"""tlexp's model, data and phase callback in your own pl.Trainer: python examples/own_trainer.py <image folder>."""

import sys

import pytorch_lightning as pl

import tlexp

cfg = tlexp.compose(f"data.root={sys.argv[1]}", "model=resnet18", "strategy=blocks_1", *sys.argv[2:])
data = tlexp.ImageDataModule.from_config(cfg)  # lists and splits the images (70/15/15)
model = tlexp.TransferModule.from_config(cfg, data)  # its preprocessing reaches the data through the trainer
phases = tlexp.PhasedFinetuning.from_config(cfg, model)  # phase A: head only; phase B: the last block too
trainer = pl.Trainer(max_epochs=phases.epochs, callbacks=[phases], logger=False, enable_checkpointing=False)
trainer.fit(model, datamodule=data)
print(trainer.test(model, datamodule=data)[0])

"""TransferModule: a pretrained backbone, a new head, the loss, metrics and named optimizer groups."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from tlexp.data.transforms import Preprocessing
from tlexp.features.cut import cut_frozen_prefix
from tlexp.model.backbones import build_backbone
from tlexp.model.losses import batch_weight, build_loss
from tlexp.model.optim import build_optimizer, build_schedule
from tlexp.speed.defaults import resolve_channels_last


def make_head(feature_dim: int, num_classes: int, hidden_dim: int | None, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    if hidden_dim:
        layers += [nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True)]
        feature_dim = hidden_dim
    return nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


def epoch_mean() -> MeanMetric:
    """An epoch's mean loss, nan where a batch's is: torchmetrics' default drops nan batches with a warning, so
    the epoch a run diverged in reported the finite mean of the batches before. (A nan imputed with nan: the
    strategy "disable" would also drop the batches' weights, torchmetrics #3434.)"""
    return MeanMetric(nan_strategy=float("nan"))


def mirror_average(logits: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: log of the mean of the two views' class probabilities (softmax of
    the result is that mean, so the loss, the metrics and tlexp-predict see one ensemble)."""
    return torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)


def with_mirror(net, x: torch.Tensor) -> torch.Tensor:
    """``net`` on a batch and its horizontal mirror, in one pass of 2N images."""
    n = x.shape[0]  # a size, not len(): torch.export keeps the batch dynamic (chunk(2) and len() would fix it)
    logits = net(torch.cat([x, x.flip(-1)]))
    return mirror_average(logits[:n], logits[n:])


class MirrorAveraged(nn.Module):
    """An exportable image -> logits network with flip TTA (tlexp-export of a model.tta=flip run)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_mirror(self.net, x)


class TransferModule(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        class_names: list[str],
        class_counts: list[int],
        loss: dict,
        optim: dict,
        backbone_lr_factor: float,
        total_epochs: int | None = None,
        image_size: int | None = None,
        channels_last: bool = False,
    ):
        """``total_epochs``: the length of a cosine schedule (default: the trainer's ``max_epochs``);
        ``image_size``: the crop size trained at (default: the weights'); ``channels_last``: NHWC tensors."""
        super().__init__()
        self.save_hyperparameters()
        built = build_backbone(model["source"], model["name"], model["weights"])
        self.backbone_spec = built
        self.backbone = built.body
        num_classes = len(class_names)
        self.head = make_head(built.feature_dim, num_classes, model["head"]["hidden_dim"], model["head"]["dropout"])
        self.criterion = build_loss(loss, class_counts)
        # torchmetrics states, synced across DDP ranks by count: each image weighs the same in every mean
        # (in the loss's, its class weight where the loss has them)
        self.train_loss, self.val_loss, self.test_loss = epoch_mean(), epoch_mean(), epoch_mean()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_recall = MulticlassRecall(num_classes, average="none")
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_results: dict = {}
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        # The images it is fed (the weights' preprocessing at image_size); saved in checkpoints for tlexp-predict.
        self.preprocessing: Preprocessing = built.preprocessing.at_size(image_size)
        # The head's rate; Lightning's LR finder (tune.use_suggestion) sets it under this name.
        self.learning_rate: float = optim["lr"]
        # model.tta=flip: evaluation (validation, test, predict, export) averages each image with its mirror
        self.tta = model.get("tta", "none")
        # trainable parameters -> graph from the frozen-prefix cache's values to pooled features. A plain
        # dict, outside the module tree: it shares the backbone's modules, and the checkpoint keys stay the backbone's.
        self._suffixes: dict[frozenset[int], nn.Module] = {}

    @classmethod
    def from_config(cls, cfg, data) -> TransferModule:
        """From a composed config (``tlexp.compose``) and the ``ImageDataModule`` it will train on."""
        container = lambda node: OmegaConf.to_container(node, resolve=True)
        return cls(
            model=container(cfg.model), class_names=data.class_names, class_counts=data.class_counts,
            loss=container(cfg.loss), optim=container(cfg.optim), backbone_lr_factor=cfg.finetune.backbone_lr_factor,
            image_size=cfg.data.image_size, channels_last=resolve_channels_last(cfg.perf.channels_last, cfg.trainer.accelerator),
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["preprocessing"] = self.preprocessing.as_dict()
        if self._trainer is not None:  # the precision its test figures were computed in: tlexp-predict serves in it
            checkpoint["precision"] = str(self.trainer.precision)

    def train(self, mode: bool = True):
        """Frozen BatchNorm stays in eval mode (running statistics untouched), as Keras does."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def forward(self, x: torch.Tensor | dict) -> torch.Tensor:
        """Images, or the values the frozen prefix computed from them (``{"inputs": [...]}``, tlexp/features/;
        with flip TTA the mirrors' too, ``"mirrored"``)."""
        mirror = self.tta == "flip" and not self.training
        if isinstance(x, dict):
            # Cached values arrive in their stored dtype (fp16 where exact enough): cast per batch to the
            # weights' dtype (fp32, or a *-true run's bf16/fp16, which Lightning's loop has cast them to already).
            run = lambda values: self.head(self._suffix()(*(self._layout(v.to(self.dtype)) for v in values)))
            return mirror_average(run(x["inputs"]), run(x["mirrored"])) if mirror else run(x["inputs"])
        images = self._layout(x)
        return with_mirror(self._images_to_logits, images) if mirror else self._images_to_logits(images)

    def _images_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _suffix(self) -> nn.Module:
        """The backbone from the cut in front of what trains now: the same cut the cache was built at."""
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        key = frozenset(id(p) for p in trainable)
        if key not in self._suffixes:
            self._suffixes[key] = cut_frozen_prefix(self.backbone_spec, trainable).suffix
        return self._suffixes[key]

    def _step(self, batch, stage: str, accuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # update(), not forward: only epoch values are logged, and a forward also computes the batch's own value:
        # 76 tensor ops per step against 32 (MulticlassAccuracy + MeanMetric at batch 32, counted with a
        # TorchDispatchMode), i.e. kernel launches on a GPU, where a batch-32 step is launch-bound
        accuracy.update(logits, y if y.dim() == 1 else y.argmax(1))  # MixUp/CutMix labels: the larger share counts
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(loss.detach(), weight=batch_weight(self.criterion, y))
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", self.train_acc)[0]
        self.log("train/loss_step", loss, on_step=True, on_epoch=False)  # every trainer.log_every_n_steps: the noisy view
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, "test", self.test_acc)
        for metric in (self.test_f1, self.test_recall, self.test_confmat):
            metric.update(logits, batch[1])
        return logits  # for tlexp.callbacks.dashboard's misclassified grid

    def on_test_epoch_end(self) -> None:
        f1 = self.test_f1.compute()
        recall = self.test_recall.compute()
        confusion = self.test_confmat.compute()
        tested = confusion.sum(dim=1) > 0  # a class with no test image has no recall (not 0.0)
        self.log("test/f1_macro", f1)
        for name, value, seen in zip(self.hparams.class_names, recall, tested):
            if seen:
                self.log(f"test/recall/{name}", value)
        self.test_results = {
            "test_f1_macro": float(f1),
            "test_recall_per_class": {n: v if seen else None for n, v, seen in zip(self.hparams.class_names, recall.tolist(), tested)},
            "confusion_matrix": confusion.tolist(),
        }
        for metric in (self.test_f1, self.test_recall, self.test_confmat):
            metric.reset()

    def configure_optimizers(self):
        cfg = self.hparams.optim
        lr = self.learning_rate
        groups = [
            {"name": "head", "params": list(self.head.parameters()), "lr": lr},
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr": lr * self.hparams.backbone_lr_factor},
        ]
        optimizer = build_optimizer(cfg, groups, lr)
        epochs = self.hparams.total_epochs or self.trainer.max_epochs
        schedule = build_schedule(cfg, optimizer, epochs, self.trainer.max_epochs, lambda: self.trainer.estimated_stepping_batches)
        return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


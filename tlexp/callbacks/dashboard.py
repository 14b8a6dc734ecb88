"""What a run shows beyond Lightning's scalars: the phase switch as text, and the test set's
confusion matrix and misclassified images, in TensorBoard and as PNGs in the run dir.

Images go through ``TensorBoardLogger.experiment``, which is a no-op on ranks other than 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from tlexp.report.plotting import closing_figures, pyplot

COUNTED_CLASSES = 30  # a confusion matrix of more classes is colour alone: the counts no longer fit their cells
MAX_INCHES = 20


def tensorboard_writers(trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def confusion_figure(matrix: list[list[int]], names: list[str]):
    """Counts as text, colour by row share (recall), so a rare class's errors show on imbalanced data.

    Not torchmetrics' ``ConfusionMatrix.plot()``: it colours and labels cells with one matrix, counts or shares, not both.
    """
    plt = pyplot()
    counts = torch.tensor(matrix, dtype=torch.float64)
    recall = counts / counts.sum(1, keepdim=True).clamp(min=1)
    # bounded: 102 classes made a 7,300-pixel square with 10,404 labels
    counted = len(names) <= COUNTED_CLASSES
    size = min(1.6 + 0.7 * len(names), MAX_INCHES)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)) if counted else []:
        for j in range(len(names)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if recall[i, j] > 0.5 else "black", fontsize=9)
    small = {} if counted else {"fontsize": 5}
    ax.set_xticks(range(len(names)), names, rotation=45 if counted else 90, ha="right" if counted else "center", **small)
    ax.set_yticks(range(len(names)), names, **small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({'counts; ' if counted else ''}colour = row share)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def misclassified_figure(images: list[torch.Tensor], captions: list[str]):
    plt = pyplot()
    columns = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(caption, fontsize=9)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("misclassified test images: true → predicted (probability)")
    fig.tight_layout()
    return fig


class TestDashboard(Callback):
    """Collects the first ``max_images`` misclassified test images; draws both figures at test end."""

    def __init__(self, out_dir: Path, max_images: int = 16):
        self.out_dir = Path(out_dir)
        self.max_images = max_images
        self._wrong: list[tuple[torch.Tensor, int, int, float]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._wrong = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        images, labels = batch
        confidence, predicted = outputs.softmax(1).max(1)
        for i in (predicted != labels).nonzero().flatten()[: self.max_images - len(self._wrong)].tolist():
            self._wrong.append((images[i].float().cpu(), int(labels[i]), int(predicted[i]), float(confidence[i])))

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        names = pl_module.hparams.class_names
        prep = pl_module.preprocessing
        mean = torch.tensor(prep.mean).view(3, 1, 1)
        std = torch.tensor(prep.std).view(3, 1, 1)
        with closing_figures():
            figures = {
                "confusion_matrix": confusion_figure(pl_module.test_results["confusion_matrix"], names),
                "misclassified": misclassified_figure(
                    [(x * std + mean).clamp(0, 1) for x, *_ in self._wrong],
                    [f"{names[t]} → {names[p]} ({c:.2f})" for _, t, p, c in self._wrong],
                ),
            }
            for name, fig in figures.items():
                fig.savefig(self.out_dir / f"{name}.png", dpi=110)
                for writer in tensorboard_writers(trainer):
                    writer.add_figure(f"test/{name}", fig, global_step=trainer.global_step, close=False)

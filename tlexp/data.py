"""ImageDataModule: TF Flowers (downloaded or local) and any ImageFolder tree, split and transformed."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from tlexp import splits
from tlexp.download import download_and_extract
from tlexp.errors import TlexpError
from tlexp.preprocessing import Preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    def __init__(self, samples: list[splits.Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        return self.transform(rgb), sample.label


class ImageDataModule(pl.LightningDataModule):
    """Lists files once, splits them (seeded, stratified) and serves train/val/test loaders.

    ``cfg`` is the ``data`` config group; ``split_file`` is where the split is recorded (run dir).
    ``preprocessing`` comes from the backbone, which is built after ``setup()`` has found the classes.
    """

    def __init__(self, cfg, seed: int, split_file: Path | None = None, preprocessing: Preprocessing | None = None):
        super().__init__()
        self.cfg = cfg
        self.preprocessing = preprocessing
        self.seed = seed
        self.split_file = split_file
        self.split: dict[str, list[splits.Sample]] = {}
        self.class_names: list[str] = []

    @property
    def root(self) -> Path:
        return Path(self.cfg.root).expanduser()

    def prepare_data(self) -> None:
        if self.cfg.kind == "tf_flowers" and not self.root.exists():
            download_and_extract(self.cfg.url, self.cfg.sha256, self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.split:
            return
        self.prepare_data()
        splits.check_root(self.root, "Set data.root=<folder of class sub-folders> (or data=tf_flowers to download).")
        presplit = splits.presplit_classes(self.root)
        if presplit is not None:
            self.class_names = list(presplit["train"])
            self.split = {
                subset: [splits.Sample(p, label) for label, files in enumerate(classes.values()) for p in files[: self.cfg.limit_per_class]]
                for subset, classes in presplit.items()
            }
        else:
            classes = splits.list_classes(self.root)
            self.class_names = list(classes)
            self.split = splits.stratified_split(self.root, classes, tuple(self.cfg.split), self.seed, self.cfg.limit_per_class)
        for subset in ("train", "val", "test"):
            if not self.split[subset]:
                raise TlexpError(f"the {subset} split is empty: add images, raise data.limit_per_class or change data.split")
        if self.split_file is not None:
            splits.write_split(self.split_file, self.root, self.split, self.class_names)
        log.info(
            "data %s: %d classes, %s images (train/val/test)", self.root, len(self.class_names),
            "/".join(str(len(self.split[s])) for s in ("train", "val", "test")),
        )

    @property
    def class_counts(self) -> list[int]:
        counts = Counter(s.label for s in self.split["train"])
        return [counts[i] for i in range(len(self.class_names))]

    def _loader(self, subset: str, train: bool) -> DataLoader:
        transform = train_transform(self.preprocessing, self.cfg.augment) if train else eval_transform(self.preprocessing)
        return DataLoader(
            ImageListDataset(self.split[subset], transform),
            batch_size=self.cfg.batch_size,
            shuffle=train,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

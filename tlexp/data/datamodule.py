"""ImageDataModule: TF Flowers (downloaded or local) and any ImageFolder tree, split and transformed."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from tlexp import seeds
from tlexp.data import files
from tlexp.data.download import download_and_extract
from tlexp.data.images import bad_image_policy, load_rgb
from tlexp.data.transforms import (
    Preprocessing,
    batch_mixing,
    eval_geometry,
    eval_transform,
    train_geometry,
    train_transform,
)
from tlexp.errors import TlexpError
from tlexp.features.cache import FrozenPrefixCache
from tlexp.model.finetune import upcoming_epoch

log = logging.getLogger(__name__)
TF_FLOWERS_FOLDER = "flower_photos"  # the archive's top folder, whichever mirror data.url names


class ImageListDataset(Dataset):
    """(image, label) pairs; an ``(index, seed)`` key seeds that image's random augmentation."""

    def __init__(self, samples: list[files.Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        rgb = load_rgb(sample.path)
        if seed is None:
            return self.transform(rgb), sample.label
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream (dropout) untouched
            torch.manual_seed(seed)
            return self.transform(rgb), sample.label


class EpochSeededSampler(Sampler):
    """Shuffles by (seed, epoch) and gives every image an augmentation seed of (seed, epoch, index).

    Nothing depends on the global RNG, on the number of workers or on when Lightning creates the
    iterator, so a run resumed at epoch k draws exactly the batches of a run that never stopped.
    """

    def __init__(self, size: int, seed: int, epoch: Callable[[], int]):
        self.size = size
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch = self.epoch()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seeds.mix(seeds.SHUFFLE, self.seed, epoch)))
        for index in order.tolist():
            yield index, seeds.mix(seeds.AUGMENT, self.seed, epoch, index)


class ImageDataModule(pl.LightningDataModule):
    """Lists files once, splits them (seeded, stratified) and serves train/val/test loaders.

    ``cfg`` is the ``data`` config group; ``split_file`` is where the split is recorded (run dir).
    ``preprocessing`` defaults to the model's it is trained with (``TransferModule.preprocessing``):
    the model is built after ``setup()`` has found the classes. Where the trainer has a
    ``FrozenPrefixCache``, training and validation serve its cached values in the phases it covers.
    """

    def __init__(self, cfg, seed: int, split_file: Path | None = None, preprocessing: Preprocessing | None = None):
        super().__init__()
        self.cfg = cfg
        self._preprocessing = preprocessing
        self.seed = seed
        self.split_file = split_file
        self.split: dict[str, list[files.Sample]] = {}
        self.class_names: list[str] = []
        self.skipped: dict[str, str] = {}  # relative path -> why it was skipped (data.on_bad_image=skip)
        self._image_loaders: dict[str, DataLoader] = {}
        self._mixing = None  # MixUp / CutMix of training batches, set with the classes (setup)
        self._told_dropped = False  # the log says once that the training loader drops a last batch of one

    @classmethod
    def from_config(cls, cfg, split_file: Path | None = None) -> ImageDataModule:
        """From a composed config (``tlexp.compose``); lists and splits the images now, so ``class_names`` is known."""
        data = cls(cfg.data, seed=cfg.seed, split_file=split_file)
        data.setup()
        return data

    @property
    def preprocessing(self) -> Preprocessing:
        if self._preprocessing is not None:
            return self._preprocessing
        model = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(model, "preprocessing", None) is None:
            raise TlexpError("ImageDataModule has no preprocessing: pass preprocessing=, or train it with a TransferModule")
        return model.preprocessing

    @property
    def root(self) -> Path:
        if not self.cfg.root:  # Path("") is the working directory, whose folders would be taken for classes
            raise TlexpError("data.root has no value: give data.root=<folder of class sub-folders>")
        return Path(self.cfg.root).expanduser()

    def prepare_data(self) -> None:
        if self.cfg.kind == "tf_flowers" and not self.root.exists():
            if self.root.name != TF_FLOWERS_FOLDER:  # a typo: the download would end, hundreds of MB later, in "no top folder"
                raise TlexpError(
                    f"data.root={self.root} does not exist; a download extracts to {self.root.parent / TF_FLOWERS_FOLDER}: point "
                    "data.root there (or, for a folder of class sub-folders you already have, data=imagefolder data.root=<it>)"
                )
            download_and_extract(self.cfg.url, self.cfg.sha256, self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.split:
            return
        self.prepare_data()
        files.check_root(self.root, "Set data.root=<folder of class sub-folders> (or data=tf_flowers to download).")
        presplit = files.presplit_classes(self.root)
        trees = self._readable(presplit if presplit is not None else {"": files.list_classes(self.root)})
        if presplit is not None:
            self.class_names = list(trees["train"])
            self.split = {
                subset: [files.Sample(p, label) for label, paths in enumerate(classes.values()) for p in paths[: self.cfg.limit_per_class]]
                for subset, classes in trees.items()
            }
        else:
            classes = trees[""]
            self.class_names = list(classes)
            split_seed = self.cfg.get("split_seed")
            split_seed = self.seed if split_seed is None else split_seed
            self.split = files.stratified_split(self.root, classes, tuple(self.cfg.split), split_seed, self.cfg.limit_per_class)
        for subset in ("train", "val", "test"):
            if not self.split[subset]:
                raise TlexpError(f"the {subset} split is empty: add images, raise data.limit_per_class or change data.split")
        self._mixing = batch_mixing(self.cfg.augment, len(self.class_names))
        if self.split_file is not None:
            files.write_split(self.split_file, self.root, self.split, self.class_names)
        log.info(
            "data %s: %d classes, %s images (train/val/test)", self.root, len(self.class_names),
            "/".join(str(len(self.split[s])) for s in ("train", "val", "test")),
        )

    def _readable(self, trees: dict[str, dict[str, list[Path]]]) -> dict[str, dict[str, list[Path]]]:
        """Apply ``data.on_bad_image`` before splitting: good files split as if bad ones were not there."""
        paths = [p for classes in trees.values() for files in classes.values() for p in files]
        checks = Path(self.cfg.image_checks).expanduser() if self.cfg.image_checks else None
        bad = bad_image_policy(paths, self.cfg.on_bad_image, "data.on_bad_image", checks, self.cfg.num_workers, self.root)
        if not bad:
            return trees
        self.skipped = {str(p.relative_to(self.root)): why for p, why in sorted(bad.items())}
        readable = {t: {c: [p for p in files if p not in bad] for c, files in classes.items()} for t, classes in trees.items()}
        empty = [f"{t}/{c}" if t else c for t, classes in readable.items() for c, files in classes.items() if not files]
        if empty:  # a pre-split tree's are named with their subset (val/cat)
            raise TlexpError(
                f"class folder(s) under {self.root} with no readable image left after skipping bad files: {', '.join(empty)}. "
                "Add images that decode, or remove the folder(s)"
            )
        return readable

    @property
    def class_counts(self) -> list[int]:
        counts = Counter(s.label for s in self.split["train"])
        return [counts[i] for i in range(len(self.class_names))]

    def image_dataset(self, subset: str, train: bool, pixels: bool = False) -> ImageListDataset:
        """Model inputs, or with ``pixels`` the cropped uint8 images before normalization."""
        if pixels:
            transform = train_geometry(self.preprocessing, self.cfg.augment) if train else eval_geometry(self.preprocessing)
        else:
            transform = train_transform(self.preprocessing, self.cfg.augment) if train else eval_transform(self.preprocessing)
        return ImageListDataset(self.split[subset], transform)

    def _loader(self, subset: str, train: bool) -> DataLoader:
        """Cached values of this epoch's phase, else images, from a loader built once per subset.

        Lightning asks for loaders every epoch when a phase's cached view changes; an image loader is
        then handed back as it is, so its persistent workers are not started again each epoch.
        """
        cache = FrozenPrefixCache.of(self.trainer) if subset != "test" else None
        cached = cache.dataset(subset, self._current_epoch(), self.trainer.lightning_module, self) if cache else None
        if cached is None and subset in self._image_loaders:
            return self._image_loaders[subset]
        dataset = cached if cached is not None else self.image_dataset(subset, train)
        sampler = EpochSeededSampler(len(dataset), self.seed, self._current_epoch) if train else self._evaluation_sampler(dataset)
        workers = 0 if cached is not None else self.cfg.num_workers  # cached tensors are in memory already
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # Its own generator: the workers' base seed is then not drawn from the global RNG either.
        loader = DataLoader(
            dataset, batch_size=self.cfg.batch_size, sampler=sampler, generator=torch.Generator(),
            num_workers=workers, persistent_workers=workers > 0, pin_memory=on_gpu,
            drop_last=train and self._last_batch_of_one(len(dataset)),
        )
        if cached is None:
            self._image_loaders[subset] = loader
        return loader

    def _last_batch_of_one(self, size: int) -> bool:
        """Whether each epoch's last training batch would hold one image, on which BatchNorm cannot train.

        Under DDP, Lightning gives each rank ``ceil(size / world_size)`` images (its DistributedSampler
        pads) and keeps the loader's ``drop_last`` when it puts that sampler in: the rank's share decides.
        A longer last batch is kept, and so is a share of one image, which is all there is to train on.
        The first loader that drops it says so in the log.
        """
        world = self.trainer.world_size if self.trainer is not None else 1
        share = math.ceil(size / world)
        if share == 1 or share % self.cfg.batch_size != 1:
            return False
        if not self._told_dropped:
            self._told_dropped = True
            log.info(
                "the last training batch would hold 1 image%s: dropped each epoch (BatchNorm cannot train on one)",
                "" if world == 1 else " on each of the ranks",
            )
        return True

    def _evaluation_sampler(self, dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each validation and test image on one rank, once.

        Lightning's own DistributedSampler pads the last batch with repeated images so every rank has
        as many: the test figures (accuracy, confusion matrix) would count some images twice.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or len(dataset) < trainer.world_size:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)

    def _current_epoch(self) -> int:
        return upcoming_epoch(self.trainer)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """MixUp / CutMix (``data.augment.mixup_alpha`` / ``cutmix_alpha``) on training batches, on their device."""
        if self.trainer is not None and self.trainer.training and self._mixing is not None:
            return self._mixing(*batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

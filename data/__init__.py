"""Datasets, transforms and loaders for image-text retrieval.

Config keys used here (a resolved config: configs/schema.py holds the defaults): ``dataset`` (flickr | coco |
custom), ``image_root``, ``ann_root`` (flickr/coco), ``train_file`` / ``val_file`` / ``test_file`` (custom),
``image_size``, ``max_words``, and for training ``min_scale`` (RandomResizedCrop) and ``autocontrast`` (official |
fixed, RandomAugment's AutoContrast).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.retrieval import DataError, RetrievalEvalDataset, RetrievalTrainDataset, load_image
from data.transforms import CLIP_MEAN, CLIP_STD, RandomAugment, _normalize, test_transform, train_transform
from data.utils import pre_caption
from utils import download_file

__all__ = [
    "ANNOTATION_FILES",
    "ANNOTATION_URL_PREFIX",
    "CLIP_MEAN",
    "CLIP_STD",
    "DataError",
    "RandomAugment",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "SPLITS",
    "annotation_path",
    "blip2_train_transform",
    "config_train_transform",
    "create_dataset",
    "create_loader",
    "load_image",
    "pre_caption",
    "test_transform",
    "train_transform",
]

ANNOTATION_URL_PREFIX = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"

ANNOTATION_FILES: dict[str, dict[str, str]] = {
    "flickr": {"train": "flickr30k_train.json", "val": "flickr30k_val.json", "test": "flickr30k_test.json"},
    "coco": {
        "train": "coco_karpathy_train.json",
        "val": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
}

SPLITS = ("train", "val", "test")
_CUSTOM = "custom"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'; valid splits: {list(SPLITS)}.")


def annotation_path(config: dict[str, Any], split: str, download: bool = True, url_prefix: str | None = None) -> str:
    """Return the path of an existing annotation file for ``split``, downloading it if needed.

    flickr/coco: ``<ann_root>/<official file name>``, fetched from ``url_prefix`` (default
    ANNOTATION_URL_PREFIX) when missing and ``download`` is true. custom: the path in the
    ``<split>_file`` config key. Raises DataError with the fix when the file cannot be provided.
    """
    _check_split(split)
    dataset = config.get("dataset")
    if dataset == _CUSTOM:
        key = f"{split}_file"
        if not config.get(key):
            raise DataError(
                f"dataset: custom needs the config key '{key}' (path to the {split} annotation JSON); "
                f"it is missing. Set train_file, val_file and test_file."
            )
        path = str(config[key])
        if not os.path.isfile(path):
            raise DataError(f"Annotation file not found: {path} (from config key '{key}').")
        return path
    if dataset not in ANNOTATION_FILES:
        valid = sorted([*ANNOTATION_FILES, _CUSTOM])
        raise DataError(f"Unknown dataset '{dataset}' in config key 'dataset'; valid values: {valid}.")
    if not config.get("ann_root"):
        raise DataError(f"dataset: {dataset} needs the config key 'ann_root' (folder for the annotation JSONs).")

    filename = ANNOTATION_FILES[dataset][split]
    path = os.path.join(str(config["ann_root"]), filename)
    if os.path.isfile(path):
        return path
    prefix = ANNOTATION_URL_PREFIX if url_prefix is None else url_prefix
    url = prefix.rstrip("/") + "/" + filename
    if not download:
        raise DataError(
            f"Annotation file not found: {path} (dataset: {dataset}, split: {split}). "
            f"Download it from {url} into ann_root, or allow automatic download."
        )
    try:
        download_file(url, path)
    except (OSError, ValueError) as exc:
        # OSError covers HTTP errors, DNS/connection failures and disk errors (urllib's URLError is
        # one); ValueError an unusable URL.
        raise DataError(
            f"Annotation file not found: {path} (dataset: {dataset}, split: {split}), and downloading it "
            f"from {url} failed: {exc}\n"
            f"If this machine has no internet access, download the file elsewhere and place it at {path} "
            f"by hand (ann_root={config['ann_root']})."
        ) from exc
    return path


def config_train_transform(config: dict[str, Any]) -> Any:
    """BLIP's training transform from the config keys image_size, min_scale, autocontrast and train_augment: the
    one place those keys become a transform (retrieval, captioning and CIR training)."""
    return train_transform(
        int(config["image_size"]),
        min_scale=float(config["min_scale"]),
        autocontrast=config["autocontrast"],
        augment=config["train_augment"],
    )


def blip2_train_transform(config: dict[str, Any]) -> Any:
    """The training transform of `model: blip2`. train_augment official: LAVIS's blip2_image_train (random resized
    crop, scale (min_scale, 1), bicubic, and a horizontal flip; no RandomAugment, unlike BLIP); crop and none as for
    BLIP (config_train_transform)."""
    if config["train_augment"] != "official":
        return config_train_transform(config)
    crop = transforms.RandomResizedCrop(
        int(config["image_size"]), scale=(float(config["min_scale"]), 1.0), interpolation=InterpolationMode.BICUBIC
    )
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(), _normalize()])


def create_dataset(config: dict[str, Any], split: str, transform: Any = None) -> Dataset:
    """Build the train dataset (augmented) for split 'train', else the eval dataset for 'val'/'test'.

    `transform`: the model's own image transform (a CLIP model's, models/clip.py `dataset_transform`); None builds
    BLIP's from the config keys."""
    _check_split(split)
    for key in ("image_root", "image_size"):
        if key not in config:
            raise DataError(f"Config key '{key}' is required to build the {split} dataset.")
    ann_file = annotation_path(config, split)
    max_words = int(config["max_words"])
    size = int(config["image_size"])
    if split == "train":
        if transform is None:
            transform = config_train_transform(config)
        return RetrievalTrainDataset(ann_file, config["image_root"], transform, max_words=max_words)
    transform = test_transform(size) if transform is None else transform
    return RetrievalEvalDataset(ann_file, config["image_root"], transform, max_words=max_words)


def create_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    is_train: bool,
    sampler: Sampler | None = None,
) -> DataLoader:
    """DataLoader with the reference settings: train shuffles (unless a sampler does) and drops the last
    partial batch; eval keeps order and every sample."""
    if is_train:
        # With a (distributed) sampler each process only sees len(sampler) samples.
        sized = sampler if sampler is not None and hasattr(sampler, "__len__") else dataset
        n = len(sized)  # type: ignore[arg-type]
        if n < batch_size:
            per_process = " per process" if sampler is not None else ""
            raise DataError(
                f"The training set has {n} samples{per_process}, fewer than "
                f"batch_size={batch_size}; with drop_last=True that gives zero batches per epoch. "
                "Lower the batch size or add data."
            )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        sampler=sampler,
        shuffle=is_train and sampler is None,
        drop_last=is_train,
        persistent_workers=num_workers > 0,
    )

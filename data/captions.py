"""Captioning data: the COCO Karpathy caption files, their COCO-format ground truth, and folders of images.

Training and evaluation read the same JSON files as retrieval (data/retrieval.py validates them):
- train: one record per caption `{"image": path, "caption": str, "image_id": id}`; an item is
  `(image, prompt + pre_caption(caption, max_words))`, as in the official coco_karpathy_train;
- val/test: one record per image `{"image": path, "caption": [str, ...]}`; an item is `(image, index)`.
References for the metrics: with `dataset: coco`, the official COCO-format ground truth
`coco_karpathy_{val,test}_gt.json` (`{"annotations": [{"image_id": int, "caption": str}, ...], ...}`, downloaded
into `coco_gt_root`), keyed by the id in the COCO file name (`COCO_val2014_000000391895.jpg` -> 391895) as the
official evaluation does; otherwise the raw caption lists of the val/test JSON, keyed by image path.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch.utils.data import Dataset

from data import ANNOTATION_URL_PREFIX, annotation_path, config_train_transform, test_transform
from data.retrieval import DataError, RetrievalEvalDataset, RetrievalTrainDataset, load_image
from utils import download_file

COCO_GT_FILES = {"val": "coco_karpathy_val_gt.json", "test": "coco_karpathy_test_gt.json"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_COCO_ID = re.compile(r"_(\d+)\.\w+$")


class CaptionTrainDataset(RetrievalTrainDataset):
    """Retrieval's train records; items are (image, prompt + pre_caption(caption))."""

    def __init__(self, ann_file: str, image_root: str, transform, prompt: str, max_words: int = 30) -> None:
        super().__init__(ann_file, image_root, transform, max_words)
        self.prompt = prompt

    def __getitem__(self, index: int) -> tuple[Any, str]:
        image, caption, _ = super().__getitem__(index)
        return image, self.prompt + caption


class CaptionEvalDataset(RetrievalEvalDataset):
    """Retrieval's val/test records; items are (image, index). `keys[i]` names image i in results and references:
    the COCO id when `coco_ids` (the official evaluation's image_id), else its relative path."""

    def __init__(self, ann_file: str, image_root: str, transform, coco_ids: bool = False) -> None:
        super().__init__(ann_file, image_root, transform)
        self.keys: list[int | str] = [coco_image_id(p) if coco_ids else p for p in self.image]
        self.raw_captions = {key: list(rec["caption"]) for key, rec in zip(self.keys, self.annotation, strict=True)}


def coco_image_id(path: str) -> int:
    """The COCO id in a COCO file name, as the official evaluation parses it: .../COCO_val2014_000000391895.jpg ->
    391895."""
    match = _COCO_ID.search(os.path.basename(path))
    if not match:
        raise DataError(
            f"cannot read a COCO image id from {path!r} (expected a name like COCO_val2014_000000391895.jpg)"
        )
    return int(match.group(1))


def load_coco_gt(path: str) -> dict[int, list[str]]:
    """{image_id: [captions]} from a COCO-format caption file (coco_karpathy_{val,test}_gt.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"COCO ground-truth file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"COCO ground-truth file {path} is not valid JSON (UTF-8 text): {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path} is not a COCO caption file: expected an object with an 'annotations' list")
    refs: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotation {i} needs 'image_id' and a string 'caption', got {ann!r:.100}")
        refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    return refs


def coco_gt_path(config: dict, split: str) -> str:
    """The official ground truth of `split` under coco_gt_root, downloaded once (as the official evaluation does)."""
    name = COCO_GT_FILES[split]
    path = os.path.join(config["coco_gt_root"], name)
    if not os.path.isfile(path):
        url = ANNOTATION_URL_PREFIX + name
        try:
            download_file(url, path)
        except (OSError, ValueError) as err:
            raise DataError(
                f"COCO caption ground truth not found at {path} and downloading {url} failed ({err}); without "
                f"network access, download it elsewhere and place it there (config key coco_gt_root)"
            ) from None
    return path


def create_caption_dataset(config: dict, split: str) -> Dataset:
    """The captioning dataset of `split` from a resolved config (same annotation keys as retrieval)."""
    ann_file = annotation_path(config, split)
    size = config["image_size"]
    if split == "train":
        transform = config_train_transform(config)
        return CaptionTrainDataset(ann_file, config["image_root"], transform, config["prompt"], config["max_words"])
    return CaptionEvalDataset(
        ann_file, config["image_root"], test_transform(size), coco_ids=config["dataset"] == "coco"
    )


def caption_references(config: dict, split: str, dataset: CaptionEvalDataset) -> dict:
    """{key: [reference captions]} for every image of `dataset` (see the module docstring for the source)."""
    if config["dataset"] != "coco":
        return dataset.raw_captions
    gt = load_coco_gt(coco_gt_path(config, split))
    missing = [k for k in dataset.keys if k not in gt]
    if missing:
        raise DataError(
            f"{len(missing)} images of the {split} split are not in the COCO ground truth (e.g. {missing[:3]})"
        )
    return {k: gt[k] for k in dataset.keys}


# ----------------------------------------------------------------------------------------------------
# Folders of images (caption.py)
# ----------------------------------------------------------------------------------------------------


def list_images(inputs: list[str], root: str | None = None) -> tuple[list[str], list[str]]:
    """(paths, names) of the images in `inputs`: folders (searched recursively for image extensions, sorted) and
    files. Images found in a folder are named relative to that folder, or to `root` when given; a file given on its
    own is named by its path as given (relative to `root` when given)."""
    paths, names = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for dirpath, _, files in os.walk(item):
                found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            for path in sorted(found):
                paths.append(path)
                names.append(os.path.relpath(path, root or item))
        elif os.path.exists(item):
            paths.append(item)
            names.append(os.path.relpath(item, root) if root else item)
        else:
            raise DataError(f"--images: {item} does not exist")
    if not paths:
        raise DataError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return paths, names


class ImageFileDataset(Dataset):
    """Images by path; an unreadable one yields (None, index, message) instead of stopping the loader."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(load_image(self.paths[index])), index, None
        except DataError as err:
            return None, index, str(err)


def collate_images(batch: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """(stacked readable images or None, their indices, [(index, error)] of the unreadable ones)."""
    good = [(image, index) for image, index, error in batch if error is None]
    failed = [(index, error) for _, index, error in batch if error is not None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], failed

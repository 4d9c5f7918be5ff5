"""CIRR (Composed Image Retrieval on Real-life images, Liu et al. ICCV 2021), release rc2: reader and datasets.

Files under `cirr_ann_root`:
  captions/cap.rc2.{train,val,test1}.json   a list of pairs:
      {"pairid": 12063, "reference": "test1-147-1-img1", "target_hard": "test1-83-0-img1",
       "target_soft": {"test1-83-0-img1": 1.0}, "caption": "remove all but one dog and add ...",
       "img_set": {"id": 1, "members": [6 image names], "reference_rank": 3, "target_rank": 4}}
      test1 pairs have no target_hard / target_soft (its labels stay on the evaluation server).
      target_soft grades images of the split as targets: 1.0 (a true target), 0.5 and 0.2 (partly), -1.0 (not); in
      rc2 val 645 of 4,181 pairs list several images, and 37 list the reference but not target_hard.
  image_splits/split.rc2.{train,val,test1}.json   {image name: path relative to cirr_image_root}, e.g.
      "test1-147-1-img1": "./test1/test1-147-1-img1.png", "train-11041-2-img0": "./train/34/train-11041-2-img0.png"
      (val images live in ./dev/). These names are the split's gallery: not every image on disk is in it.
      `gallery="folder"` instead ranks every .png of the folder holding a split's images, as CoVR's validation
      does (its src/test/blip/cirr_val.py asserts 8,102 val gallery images; split.rc2.val.json lists 2,297).

Every problem is a DataError naming the file, the pair id and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from data.retrieval import NUM_PATHS_TO_CHECK, DataError, load_image
from data.utils import pre_caption

CIRR_VERSION = "rc2"
CIRR_SPLITS = ("train", "val", "test1")
LABELLED_SPLITS = ("train", "val")  # test1 has no targets


def captions_path(ann_root: str, split: str) -> str:
    return os.path.join(ann_root, "captions", f"cap.{CIRR_VERSION}.{split}.json")


def image_split_path(ann_root: str, split: str) -> str:
    return os.path.join(ann_root, "image_splits", f"split.{CIRR_VERSION}.{split}.json")


@dataclass
class CirrPair:
    """One query: reference image + modification caption -> target (None on test1)."""

    pairid: int
    reference: str
    caption: str
    members: list[str]
    subset_id: Any
    target: str | None = None
    target_soft: dict[str, float] = field(default_factory=dict)


@dataclass
class CirrSplit:
    """A split: its pairs, and its gallery (image name -> path under image_root), in file order."""

    split: str
    pairs: list[CirrPair]
    images: dict[str, str]
    image_root: str
    captions_file: str
    split_file: str
    gallery: str = "split"  # split: the images of split_file | folder: every .png of the folder holding them

    @property
    def image_names(self) -> list[str]:
        return list(self.images)

    @property
    def has_targets(self) -> bool:
        return self.split in LABELLED_SPLITS

    def image_path(self, name: str) -> str:
        return os.path.join(self.image_root, self.images[name])


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise DataError(
            f"CIRR {what} file not found: {path}. Set cirr_ann_root to the folder holding captions/ and "
            f"image_splits/ (the cirr_dataset branch of github.com/Cuberick-Orion/CIRR)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"CIRR {what} file {path} is not valid JSON: {err}") from err


def _read_image_split(path: str) -> dict[str, str]:
    images = _read_json(path, "image split")
    if not isinstance(images, dict) or not images:
        raise DataError(
            f"{path}: expected a non-empty JSON object {{image name: relative path}}, got "
            f"{'an empty object' if isinstance(images, dict) else 'a JSON ' + type(images).__name__}"
        )
    for name, rel in images.items():
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{path}: image {name!r} must map to a relative path string, got {rel!r}")
    return images


def _field(rec: dict, key: str, types: tuple[type, ...], where: str) -> Any:
    if key not in rec:
        raise DataError(f"{where}: missing key {key!r}; it has {sorted(rec)}")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: key {key!r} must be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def _parse_pair(rec: Any, index: int, path: str, split: str, images: dict[str, str], split_file: str) -> CirrPair:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: entry {index} must be a JSON object, got {type(rec).__name__}")
    where = f"{path}: entry {index}"
    pairid = _field(rec, "pairid", (int,), where)
    where = f"{path}: pairid {pairid}"
    reference = _field(rec, "reference", (str,), where)
    caption = _field(rec, "caption", (str,), where)
    img_set = _field(rec, "img_set", (dict,), where)
    members = _field(img_set, "members", (list,), f"{where}, img_set")
    if not members or not all(isinstance(m, str) for m in members):
        raise DataError(f"{where}: img_set.members must be a non-empty list of image names, got {members!r:.120}")
    subset_id = img_set.get("id", tuple(sorted(members)))
    target, target_soft = None, {}
    if split in LABELLED_SPLITS:
        target = _field(rec, "target_hard", (str,), where)
        target_soft = _field(rec, "target_soft", (dict,), where)
        for name, grade in target_soft.items():
            if not isinstance(grade, (int, float)) or isinstance(grade, bool):
                raise DataError(f"{where}: target_soft[{name!r}] must be a number (1.0, 0.5, -1.0 ...), got {grade!r}")
    named = [("reference", reference)] + ([("target_hard", target)] if target else [])
    named += [(f"img_set.members[{i}]", m) for i, m in enumerate(members)]
    named += [("target_soft key", m) for m in target_soft]
    for key, name in named:
        if name not in images:
            raise DataError(
                f"{where}: {key} {name!r} is not in the image split {split_file} (the {split} gallery); "
                f"are the captions and image_splits files of the same split and version ({CIRR_VERSION})?"
            )
    soft = {name: float(grade) for name, grade in target_soft.items()}
    return CirrPair(pairid, reference, caption, list(members), subset_id, target, soft)


GALLERIES = ("split", "folder")


def folder_gallery(split_file: str, image_root: str, images: dict[str, str]) -> dict[str, str]:
    """Every .png (not in sub-folders) of the one folder that holds all of a split's images, name -> relative path,
    sorted by name: CoVR's validation gallery. The split's own images must all be there."""
    folders = sorted({os.path.dirname(os.path.normpath(rel)) for rel in images.values()})
    if len(folders) != 1:
        raise DataError(
            f"cirr_val_gallery: folder needs the images of {split_file} in one folder; they are in {len(folders)} "
            f"({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})"
        )
    folder = os.path.join(image_root, folders[0])
    if not os.path.isdir(folder):
        raise DataError(f"cirr_val_gallery: folder: {folder} (the folder of {split_file}'s images) does not exist")
    found = {
        entry.name[: -len(".png")]: os.path.join(folders[0], entry.name)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name)
        if entry.is_file() and entry.name.endswith(".png")
    }
    missing = [name for name in images if name not in found]
    if missing:
        raise DataError(
            f"cirr_val_gallery: folder: {len(missing)} images of {split_file} are not .png files in {folder}, "
            f"e.g. {missing[0]!r}"
        )
    return found


def load_cirr_split(
    ann_root: str, image_root: str, split: str, check_images: bool = True, gallery: str = "split"
) -> CirrSplit:
    """Read and check one split's captions and image-split files (and probe a few image files).

    gallery: "split" ranks the split file's images (CIRR); "folder" ranks every .png of the folder holding them
    (CoVR's validation), see `folder_gallery`. Pairs are checked against the split file either way."""
    if gallery not in GALLERIES:
        raise DataError(f"unknown CIRR gallery {gallery!r}; valid: {', '.join(GALLERIES)}")
    if split not in CIRR_SPLITS:
        hint = " (CIRR's test split is called test1)" if split == "test" else ""
        raise DataError(f"unknown CIRR split {split!r}{hint}; valid: {', '.join(CIRR_SPLITS)}")
    if not ann_root:
        raise DataError("config key cirr_ann_root is empty: set it to the folder holding captions/ and image_splits/")
    split_file = image_split_path(ann_root, split)
    captions_file = captions_path(ann_root, split)
    images = _read_image_split(split_file)
    records = _read_json(captions_file, "captions")
    if not isinstance(records, list) or not records:
        kind = "an empty list" if isinstance(records, list) else f"a JSON {type(records).__name__}"
        raise DataError(f"{captions_file}: expected a non-empty JSON list of pairs, got {kind}")
    pairs = [_parse_pair(rec, i, captions_file, split, images, split_file) for i, rec in enumerate(records)]
    seen: set[int] = set()
    for pair in pairs:
        if pair.pairid in seen:
            raise DataError(f"{captions_file}: pairid {pair.pairid} appears more than once")
        seen.add(pair.pairid)
    if gallery == "folder":
        images = folder_gallery(split_file, image_root, images)
    data = CirrSplit(split, pairs, images, image_root, captions_file, split_file, gallery)
    if check_images:
        for name in list(images)[:NUM_PATHS_TO_CHECK]:
            if not os.path.isfile(data.image_path(name)):
                raise DataError(
                    f"image {name!r} of {split_file} not found at {data.image_path(name)}: set cirr_image_root to "
                    f"the folder its paths ({images[name]!r}) start from (CIRR: img_raw, holding train/ dev/ test1/)"
                )
    return data


class CirrImageDataset(Dataset):
    """Images of a split by name: `(image tensor, position in names)`."""

    def __init__(self, data: CirrSplit, names: list[str], transform: Callable[[Image.Image], Any]):
        self.data, self.names, self.transform = data, list(names), transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(load_image(self.data.image_path(self.names[index]))), index


class CirrTrainDataset(Dataset):
    """One item per pair: `(reference image tensor, pre_captioned modification text, target's gallery index)`."""

    def __init__(self, data: CirrSplit, transform: Callable[[Image.Image], Any], max_words: int = 30):
        if not data.has_targets:
            raise DataError(f"CIRR split {data.split} has no targets and cannot be trained on")
        for index, pair in enumerate(data.pairs):
            if not pre_caption(pair.caption, max_words):  # the query would be the reference image alone
                raise DataError(
                    f"{data.captions_file}: entry {index} (pairid {pair.pairid}) has an empty caption {pair.caption!r}"
                    " (no words once punctuation is removed); a training pair needs a modification text"
                )
        self.data, self.transform, self.max_words = data, transform, max_words
        self.image_index = {name: i for i, name in enumerate(data.image_names)}

    def __len__(self) -> int:
        return len(self.data.pairs)

    def __getitem__(self, index: int) -> tuple[Any, str, int]:
        pair = self.data.pairs[index]
        image = self.transform(load_image(self.data.image_path(pair.reference)))
        return image, pre_caption(pair.caption, self.max_words), self.image_index[pair.target]

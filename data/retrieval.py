"""Karpathy-split retrieval datasets (Flickr30K, COCO, or anything in the same JSON format).

Train files hold one record per caption: ``{"image": path, "caption": str, "image_id": id}``.
Val/test files hold one record per image: ``{"image": path, "caption": [str, ...]}``.
``image`` paths are relative to ``image_root``.

Both classes validate their inputs when constructed, so a wrong path or a wrongly shaped file
fails at start-up with a message that says what to fix, instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Hashable
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.utils import pre_caption
from utils import UserError

# How many image paths to probe at construction. Enough to catch a wrong image_root or folder
# name, cheap enough for a 100k-record COCO file on a network drive.
NUM_PATHS_TO_CHECK = 8


class DataError(UserError, ValueError):
    """A dataset, annotation file or image is missing or malformed; the message says how to fix it."""


def load_image(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image, raising DataError (naming the file) if that fails.

    The pixel limit is PIL's own (``Image.MAX_IMAGE_PIXELS``, 89.5M pixels by default, left unchanged): PIL warns
    above it and refuses above twice it (179M pixels, e.g. 13400 x 13400) before decoding, so a small file that
    claims a huge size (a decompression bomb) is an unreadable image like any other, not a crash or 10s of GB.
    """
    try:
        with Image.open(path) as img:
            # convert() forces a full decode, so truncated files fail here and not later.
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"Image file not found: {path}") from exc
    except Image.DecompressionBombError as exc:  # not an OSError: PIL's refusal of a too-large image
        raise DataError(
            f"Could not read image file {path}: more pixels than the limit of {2 * Image.MAX_IMAGE_PIXELS} "
            f"(2 x PIL's Image.MAX_IMAGE_PIXELS), refused as a possible decompression bomb ({exc})"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # PIL raises a mix of these for corrupt or truncated files.
        raise DataError(f"Could not read image file {path}: {type(exc).__name__}: {exc}") from exc


def load_annotation(ann_file: str) -> list[dict[str, Any]]:
    """Read an annotation JSON file and check that it is a non-empty list of objects."""
    if not os.path.isfile(ann_file):
        raise DataError(
            f"Annotation file not found: {ann_file}\n"
            "For dataset: flickr or coco the Karpathy-split JSONs are downloaded into the config's "
            "`ann_root` automatically (see data.annotation_path). For dataset: custom, set the "
            "config keys `train_file`, `val_file` and `test_file` to existing JSON files."
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"Annotation file {ann_file} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"Annotation file {ann_file} is not UTF-8 text: {exc}") from exc
    if not isinstance(records, list):
        hint = ""
        if isinstance(records, dict) and {"images", "annotations"} <= set(records):
            hint = (
                " It looks like a raw COCO captions file; convert it to the Karpathy format "
                "(one record per caption for train, one record per image for val/test)."
            )
        raise DataError(
            f"Annotation file {ann_file} must contain a JSON list of records, "
            f"got a JSON {type(records).__name__}.{hint}"
        )
    if not records:
        raise DataError(f"Annotation file {ann_file} is an empty list: the split has no records.")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"Record {i} in {ann_file} must be a JSON object, got {type(rec).__name__}: {rec!r:.100}")
    return records


def _require_keys(rec: dict[str, Any], keys: tuple[str, ...], index: int, ann_file: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DataError(
            f"Record {index} in {ann_file} is missing key(s) {missing}; it has {sorted(rec)}. "
            f"Expected keys: {list(keys)}."
        )
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise DataError(f"Record {index} in {ann_file}: 'image' must be a non-empty path string.")


def _norm_folder(name: str) -> str:
    # flickr30k-images, flickr30k_images and Flickr30K Images should all compare equal.
    return re.sub(r"[-_\s]+", "", name.lower())


def _missing_image_hint(image_root: str, rel_path: str) -> str:
    """Explain the most likely reason ``rel_path`` is not under ``image_root``."""
    if not os.path.isdir(image_root):
        return f"image_root itself does not exist: {image_root}. Set `image_root` in the config."
    parts = re.split(r"[\\/]", rel_path)
    if len(parts) < 2:
        return ""
    first, rest = parts[0], os.path.join(*parts[1:])
    # Case 1: image_root points at the image folder instead of its parent.
    if _norm_folder(os.path.basename(os.path.normpath(image_root))) == _norm_folder(first) and os.path.exists(
        os.path.join(image_root, rest)
    ):
        parent = os.path.dirname(os.path.normpath(image_root))
        return (
            f"The annotation paths start with '{first}/', and image_root already is that folder. "
            f"Set image_root to its parent: {parent}"
        )
    # Case 2: a sibling folder with the same name up to '-' / '_' / case (Kaggle's flickr30k_images).
    if not os.path.isdir(os.path.join(image_root, first)):
        try:
            siblings = sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))
        except OSError:
            siblings = []
        for d in siblings:
            if _norm_folder(d) == _norm_folder(first):
                return (
                    f"The annotation paths expect a folder named '{first}' under image_root, but "
                    f"image_root contains '{d}'. Rename it (mv '{os.path.join(image_root, d)}' "
                    f"'{os.path.join(image_root, first)}') or create a symlink with the expected name."
                )
        if siblings:
            shown = ", ".join(siblings[:10]) + (", ..." if len(siblings) > 10 else "")
            return f"image_root has no folder '{first}'; it contains: {shown}."
    return ""


def check_image_paths(image_root: str, rel_paths: list[str], ann_file: str, n: int = NUM_PATHS_TO_CHECK) -> None:
    """Check that the first ``n`` images exist under ``image_root``; raise DataError with a fix if not."""
    for rel in rel_paths[:n]:
        full = os.path.join(image_root, rel)
        if not os.path.exists(full):
            hint = _missing_image_hint(image_root, rel)
            raise DataError(
                f"Image not found: {full}\n"
                f"(path '{rel}' from {ann_file}, resolved against image_root={image_root})."
                + (f"\n{hint}" if hint else "")
            )


def _unique_in_order(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class RetrievalTrainDataset(Dataset):
    """One item per caption: ``(image, pre_captioned caption, contiguous image index)``.

    ``img_ids`` maps each distinct ``image_id`` to 0..N-1 in order of first appearance; the model
    uses that index to treat other captions of the same image as positives.
    """

    def __init__(
        self,
        ann_file: str,
        image_root: str,
        transform: Callable[[Image.Image], Any] | None,
        max_words: int = 30,
    ) -> None:
        self.ann_file = ann_file
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.annotation = load_annotation(ann_file)
        self.img_ids: dict[Hashable, int] = {}
        for i, rec in enumerate(self.annotation):
            _require_keys(rec, ("image", "caption", "image_id"), i, ann_file)
            if not isinstance(rec["caption"], str):
                hint = (
                    " (a list of captions is the val/test format; train files have one record per caption)"
                    if isinstance(rec["caption"], list)
                    else ""
                )
                raise DataError(
                    f"Record {i} in {ann_file}: 'caption' must be a string, got {type(rec['caption']).__name__}{hint}."
                )
            if not pre_caption(rec["caption"], max_words):  # nothing to learn from; the model would see [CLS] [SEP]
                raise DataError(
                    f"Record {i} in {ann_file}: 'caption' {rec['caption']!r} is empty (no words once punctuation "
                    "is removed); fix or remove the record."
                )
            image_id = rec["image_id"]
            if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
                raise DataError(
                    f"Record {i} in {ann_file}: 'image_id' must be a string or an integer, "
                    f"got {type(image_id).__name__}."
                )
            if image_id not in self.img_ids:
                self.img_ids[image_id] = len(self.img_ids)
        check_image_paths(image_root, _unique_in_order([r["image"] for r in self.annotation]), ann_file)

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int) -> tuple[Any, str, int]:
        rec = self.annotation[index]
        image = load_image(os.path.join(self.image_root, rec["image"]))
        if self.transform is not None:
            image = self.transform(image)
        return image, pre_caption(rec["caption"], self.max_words), self.img_ids[rec["image_id"]]


class RetrievalEvalDataset(Dataset):
    """One item per image: ``(image, image index)``; the texts are exposed as attributes.

    Attributes: ``text`` (all captions, pre-captioned, image by image), ``image`` (relative paths),
    ``img2txt`` (image index -> its text indices) and ``txt2img`` (text index -> image index).
    """

    def __init__(
        self,
        ann_file: str,
        image_root: str,
        transform: Callable[[Image.Image], Any] | None,
        max_words: int = 30,
    ) -> None:
        self.ann_file = ann_file
        self.image_root = image_root
        self.transform = transform
        self.max_words = max_words
        self.annotation = load_annotation(ann_file)
        self.text: list[str] = []
        self.image: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_id, rec in enumerate(self.annotation):
            _require_keys(rec, ("image", "caption"), img_id, ann_file)
            captions = rec["caption"]
            if not isinstance(captions, list):
                hint = (
                    " (a single string is the train format; val/test files have one record per image "
                    "with a list of captions)"
                    if isinstance(captions, str)
                    else ""
                )
                raise DataError(
                    f"Record {img_id} in {ann_file}: 'caption' must be a list of strings, "
                    f"got {type(captions).__name__}{hint}."
                )
            if not captions:
                raise DataError(
                    f"Record {img_id} in {ann_file} ({rec['image']}) has an empty caption list; every "
                    "val/test image needs at least one caption, or recall cannot be computed."
                )
            self.image.append(rec["image"])
            self.img2txt[img_id] = []
            for j, cap in enumerate(captions):
                if not isinstance(cap, str):
                    raise DataError(
                        f"Record {img_id} in {ann_file}: caption {j} must be a string, got {type(cap).__name__}."
                    )
                txt_id = len(self.text)
                self.text.append(pre_caption(cap, max_words))
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id
        check_image_paths(image_root, self.image, ann_file)

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(os.path.join(self.image_root, self.image[index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, index

"""IMAGECODE (Krojer et al., ACL 2022): pick the one image of a set of 10 that a contextual description describes.

The public release (github.com/McGill-NLP/imagecode, images on Zenodo record 6518944 as image-sets.zip):
- `image-sets/<set>/img<N>.jpg`: 10 images per set. Video sets (MSR-VTT, Video-Storytelling, YouCook) hold
  frames, N the frame number (img0, img7, img15, ...); static sets are named `open-images-*` and hold 10 similar
  photos. The 10 candidates of a set are its files sorted by N numerically (img15 after img7).
- `train_data.json`, `valid_data.json`: `{set: {"<index>": description}}`, the index (0-9) into that sorted list.
  Train has 7,317 sets and 16,594 descriptions, valid 1,039 / 2,302.
- `test_data_unlabeled.json`: `{set: [description, ...]}` (2,306 descriptions); predictions for the leaderboard
  are `{set: [index, ...]}` in the same order.

`make_imagecode_sample` writes data in exactly this layout from the generated shapes of data.synthetic, so the
evaluation runs end to end in tests and demos.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from data.retrieval import DataError, load_image
from data.synthetic import (
    LOCATIONS,
    SPECIAL_TOKENS,
    STYLES,
    Shape,
    Template,
    _captions,
    _groups,
    _render,
    _sample_scene,
    _t_colour_positions,
    _t_list_positions,
    _t_location_first,
    _tokens,
)
from data.transforms import test_transform
from data.utils import TEXT_CLEANINGS, pre_caption

IMAGES_PER_SET = 10
_IMAGE_NAME = re.compile(r"img(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def is_static(set_name: str) -> bool:
    """Static image sets come from Open Images; every other set holds video frames."""
    return "open-images" in set_name


@dataclass
class Description:
    set_index: int  # into ImagecodeSet.set_names
    target: int  # 0-9, or -1 in the unlabelled test split
    text: str


def sorted_set_images(set_dir: str) -> list[str]:
    """The 10 image files of a set, sorted by their number N in imgN.jpg (numerically, not as strings)."""
    if not os.path.isdir(set_dir):
        raise DataError(f"IMAGECODE image set not found: {set_dir} (image_root must hold the unzipped image-sets/)")
    numbered = []
    for name in os.listdir(set_dir):
        match = _IMAGE_NAME.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), name))
    if len(numbered) != IMAGES_PER_SET:
        raise DataError(f"IMAGECODE image set {set_dir} holds {len(numbered)} imgN.jpg files, expected 10")
    return [os.path.join(set_dir, name) for _, name in sorted(numbered)]


class ImagecodeSet(Dataset):
    """One split: `set_names`, `descriptions` (a flat list) and, as the Dataset, every image of every set in
    order (item i is image i % 10 of set i // 10), transformed for evaluation."""

    def __init__(self, ann_file: str, image_root: str, image_size: int, max_words: int = 30, cleaning: str = "blip"):
        """`cleaning`: blip (data.utils.pre_caption) or albef (pre_caption_albef, ContextBLIP's zero-shot script)."""
        if cleaning not in TEXT_CLEANINGS:
            raise ValueError(f"cleaning must be one of {tuple(TEXT_CLEANINGS)}, got {cleaning!r}")
        clean = TEXT_CLEANINGS[cleaning]
        if not os.path.isfile(ann_file):
            raise DataError(f"IMAGECODE annotation file not found: {ann_file}")
        try:
            with open(ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"IMAGECODE annotation file {ann_file} is not valid JSON (UTF-8 text): {err}") from None
        if not isinstance(data, dict) or not data:
            raise DataError(
                f"{ann_file}: expected a non-empty mapping {{set_name: {{index: description}}}} (labelled) or "
                f"{{set_name: [description, ...]}} (unlabelled test), got {type(data).__name__}"
            )
        self.set_names: list[str] = []
        self.descriptions: list[Description] = []
        self.labelled = True
        for set_name, entries in data.items():
            set_index = len(self.set_names)
            self.set_names.append(set_name)
            if isinstance(entries, list):
                self.labelled = False
                self.descriptions += [Description(set_index, -1, clean(t, max_words)) for t in entries]
                continue
            if not isinstance(entries, dict):
                raise DataError(f"{ann_file}: set {set_name!r} maps to {type(entries).__name__}, expected a mapping")
            for index, text in entries.items():
                if not str(index).isdigit() or not 0 <= int(index) < IMAGES_PER_SET:
                    raise DataError(f"{ann_file}: set {set_name!r} has image index {index!r}; expected '0' to '9'")
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{ann_file}: set {set_name!r} index {index}: empty or non-text description")
                self.descriptions.append(Description(set_index, int(index), clean(text, max_words)))
        self.image_paths = [p for name in self.set_names for p in sorted_set_images(os.path.join(image_root, name))]
        self.transform = test_transform(image_size)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.image_paths[index])), index


# ----------------------------------------------------------------------------------------------------
# Generated data in the IMAGECODE layout
# ----------------------------------------------------------------------------------------------------


# The caption templates that name the cell of every shape. The frames of a generated video set show the same shapes
# in different cells, so only these tell one frame from the others: a video target is described with one of them,
# as IMAGECODE's annotators wrote each description to single out its frame among similar ones.
POSITIONAL_TEMPLATES: tuple[Template, ...] = (_t_list_positions, _t_colour_positions, _t_location_first)


def placement(scene: list[Shape]) -> tuple:
    """What a frame shows: each shape with its cell, identical shapes interchangeable."""
    return tuple(sorted((s.kind, s.colour, s.size, s.cell) for s in scene))


def sample_set_scenes(rng: random.Random, video: bool) -> list[list[Shape]]:
    """The 10 scenes of a set. Video: 2 shapes moving between grid cells, every frame a different placement (two
    equal frames could not be told apart by any description). Static: 10 unrelated scenes."""
    if not video:
        return [_sample_scene(rng) for _ in range(IMAGES_PER_SET)]
    shapes = _sample_scene(rng, 2)
    scenes: list[list[Shape]] = []
    seen: set[tuple] = set()
    while len(scenes) < IMAGES_PER_SET:  # 36 to 72 placements of 2 shapes in 9 cells, so this ends quickly
        cells = rng.sample(sorted(LOCATIONS), len(shapes))
        scene = [replace(shape, cell=cell) for shape, cell in zip(shapes, cells, strict=True)]
        if placement(scene) not in seen:
            seen.add(placement(scene))
            scenes.append(scene)
    return scenes


def describe_target(scene: list[Shape], video: bool, rng: random.Random) -> str:
    """A description of `scene`: for a video frame a positional one (POSITIONAL_TEMPLATES), which fits no other
    frame of its set; for a static image any generated caption, as its 9 neighbours are other scenes."""
    if video:
        return rng.choice(POSITIONAL_TEMPLATES)(scene, _groups(scene), rng)
    return _captions(scene, 1, rng)[0]


def make_imagecode_sample(
    out_dir: str,
    num_video_sets: int = 4,
    num_static_sets: int = 4,
    descriptions_per_set: int = 2,
    image_size: int = 32,
    seed: int = 0,
    style: str = "filled",
) -> dict[str, str]:
    """Write `image-sets/`, `valid_data.json`, `test_data_unlabeled.json` and a `vocab.txt` under `out_dir`.

    Video sets: 10 "frames" of one scene whose 2 shapes move between grid cells (no two frames alike), named like
    MSR-VTT sets, with frame numbers that sort differently as strings and as numbers; each description names where
    every shape is, the only thing that tells the frames apart. Static sets (`open-images-*`): 10 unrelated scenes,
    each description a generated caption of its target. `style`: filled shapes or their outline (data.synthetic
    STYLES). Returns the paths.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = random.Random(f"imagecode-{seed}")
    np_rng = np.random.default_rng(seed)
    image_root = os.path.join(out_dir, "image-sets")
    valid: dict[str, dict[str, str]] = {}
    test: dict[str, list[str]] = {}
    vocab: set[str] = set()
    for k in range(num_video_sets + num_static_sets):
        video = k < num_video_sets
        name = f"MSR-VTT-videoTrainValVideo_video{k}-shot1_0" if video else f"open-images-{k}_{rng.getrandbits(32):08x}"
        set_dir = os.path.join(image_root, name)
        os.makedirs(set_dir, exist_ok=True)
        scenes = sample_set_scenes(rng, video)
        frames = sorted(rng.sample(range(0, 200), IMAGES_PER_SET)) if video else list(range(IMAGES_PER_SET))
        for frame, scene in zip(frames, scenes, strict=True):
            _render(scene, image_size, rng, np_rng, style).save(os.path.join(set_dir, f"img{frame}.jpg"), quality=95)
        targets = rng.sample(range(IMAGES_PER_SET), descriptions_per_set)
        descriptions = [describe_target(scenes[t], video, rng) for t in targets]
        valid[name] = {str(t): text for t, text in zip(targets, descriptions, strict=True)}
        test[name] = descriptions
        for text in descriptions:
            vocab.update(_tokens(pre_caption(text)))
    paths = {"image_root": image_root}
    for split, content in (("valid", valid), ("test", test)):
        file = os.path.join(out_dir, f"{split}_data.json" if split == "valid" else "test_data_unlabeled.json")
        with open(file, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
        paths[f"{split}_file"] = file
    paths["vocab_file"] = os.path.join(out_dir, "vocab.txt")
    with open(paths["vocab_file"], "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL_TOKENS + sorted(vocab)) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m data.imagecode --out DIR`: write generated IMAGECODE-format data; prints the paths as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-video-sets", type=int, default=4)
    parser.add_argument("--num-static-sets", type=int, default=4)
    parser.add_argument("--descriptions-per-set", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default="filled", choices=STYLES, help="filled shapes, or their outline only")
    args = parser.parse_args(argv)
    paths = make_imagecode_sample(
        args.out,
        args.num_video_sets,
        args.num_static_sets,
        args.descriptions_per_set,
        args.image_size,
        args.seed,
        args.style,
    )
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()

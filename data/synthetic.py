"""Generate a small captioned image dataset of coloured shapes, for the demo and the tests.

Each image shows 1-3 shapes (circle, square, triangle, diamond, cross) in distinct colours, placed
in cells of a 3x3 grid on a grey, sometimes lightly noisy, background. Every caption is generated
from the scene itself, so it only states true facts (colour, shape, size, position, count,
relative placement); the captions of one image use different templates. Retrieval on this data is
learnable: a model has to bind colours to shapes and positions to tell images apart.

Layout written under ``out_dir``:
  images/{train,val,test}/NNNNN.png
  annotations/synthetic_{train,val,test}.json   (official Karpathy formats)
  vocab.txt                                     (BERT WordPiece vocab covering every caption token)

Usage: ``python -m data.synthetic --out DIR [--num-train N --num-val N --num-test N ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data.utils import pre_caption

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 190),
    "orange": (245, 140, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SIZES = {"small": 0.08, "large": 0.14}  # radius as a fraction of the image side

# Alternative phrasings for each cell (row, col) of the 3x3 grid.
LOCATIONS: dict[tuple[int, int], list[str]] = {
    (0, 0): ["in the top left corner", "at the top left", "in the upper left corner"],
    (0, 1): ["at the top", "near the top", "at the top of the image"],
    (0, 2): ["in the top right corner", "at the top right", "in the upper right corner"],
    (1, 0): ["on the left", "on the left side", "on the left of the image"],
    (1, 1): ["in the center", "in the middle", "in the center of the image"],
    (1, 2): ["on the right", "on the right side", "on the right of the image"],
    (2, 0): ["in the bottom left corner", "at the bottom left", "in the lower left corner"],
    (2, 1): ["at the bottom", "near the bottom", "at the bottom of the image"],
    (2, 2): ["in the bottom right corner", "at the bottom right", "in the lower right corner"],
}


@dataclass(frozen=True)
class Shape:
    """One drawn object: shape kind, colour name, size name and grid cell (row, col)."""

    kind: str
    colour: str
    size: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Objects that look identical (same kind, colour and size); captions count them together."""

    kind: str
    colour: str
    size: str
    cells: tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------- scenes and images


def _sample_scene(rng: random.Random, num_shapes: int | None = None) -> list[Shape]:
    n = num_shapes or rng.choice([1, 1, 2, 2, 2, 3, 3])
    cells = rng.sample(sorted(LOCATIONS), n)
    colours = rng.sample(sorted(COLOURS), n)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    sizes = [rng.choice(sorted(SIZES)) for _ in range(n)]
    if n >= 2 and rng.random() < 0.25:
        # A pair of identical shapes, so captions can say "two red circles".
        colours[1], kinds[1], sizes[1] = colours[0], kinds[0], sizes[0]
    return [Shape(k, c, s, cell) for k, c, s, cell in zip(kinds, colours, sizes, cells, strict=True)]


def _groups(scene: list[Shape]) -> list[Group]:
    order: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for s in scene:
        order.setdefault((s.kind, s.colour, s.size), []).append(s.cell)
    return [Group(k, c, z, tuple(cells)) for (k, c, z), cells in order.items()]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int, rng: random.Random, style: str = "filled") -> None:
    """`style` filled: solid shapes; outline: only their contours, `side` / 32 pixels wide (the same scene and the
    same RNG draws either way, so a dataset and its outline twin show the very same shapes)."""
    cell_w = side / 3
    jitter = 0.02 * side  # small enough that neighbouring large shapes never overlap
    cx = (shape.cell[1] + 0.5) * cell_w + rng.uniform(-jitter, jitter)
    cy = (shape.cell[0] + 0.5) * cell_w + rng.uniform(-jitter, jitter)
    r = SIZES[shape.size] * side
    colour = COLOURS[shape.colour]
    # Filled: fill the shape. Outline: draw its contour only (PIL's outline/width), the cross as one 12-gon.
    paint = {"fill": colour} if style == "filled" else {"outline": colour, "width": max(1, round(side / 32))}
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
    elif shape.kind == "square":
        h = 0.85 * r  # a square of half-side r looks bigger than a circle of radius r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], **paint)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], **paint)
    elif shape.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **paint)
    elif shape.kind == "cross":
        t = 0.3 * r
        if style == "filled":
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], **paint)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], **paint)
        else:
            # The contour's upper-right quarter, then that quarter turned by 90 degrees three times.
            quarter = [(t, -r), (t, -t), (r, -t)]
            points = []
            for _ in range(4):
                points += [(cx + x, cy + y) for x, y in quarter]
                quarter = [(-y, x) for x, y in quarter]
            draw.polygon(points, **paint)
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise ValueError(f"unknown shape {shape.kind}")


def _render(
    scene: list[Shape], side: int, rng: random.Random, np_rng: np.random.Generator, style: str = "filled"
) -> Image.Image:
    grey = rng.randint(105, 150)
    background = np.full((side, side, 3), grey, dtype=np.int16)
    if rng.random() < 0.5:
        background += np_rng.integers(-8, 9, size=background.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for shape in scene:
        _draw_shape(draw, shape, side, rng, style)
    return img


# ----------------------------------------------------------------------------- captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _group_phrase(g: Group, rng: random.Random, size: bool, loc: bool) -> str:
    words = ([g.size] if size else []) + [g.colour]
    if len(g.cells) == 1:
        text = f"{_article(words[0])} {' '.join(words)} {g.kind}"
        return f"{text} {rng.choice(LOCATIONS[g.cells[0]])}" if loc else text
    text = f"{NUMBER_WORDS[len(g.cells)]} {' '.join(words)} {PLURALS[g.kind]}"
    if loc:
        places = [rng.choice(LOCATIONS[c]) for c in g.cells]
        text += ", one " + " and one ".join(places)
    return text


def _count_shapes(scene: list[Shape]) -> str:
    return "a single shape" if len(scene) == 1 else f"{NUMBER_WORDS[len(scene)]} shapes"


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """Where cell ``a`` is relative to cell ``b``; cells are distinct."""
    if a[0] != b[0]:
        return "above" if a[0] < b[0] else "below"
    return "to the left of" if a[1] < b[1] else "to the right of"


# Each template maps (scene, groups, rng) to a caption that is true for the scene.
Template = Callable[[list[Shape], list[Group], random.Random], str]


def _t_list_positions(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    return _join([_group_phrase(g, rng, size=rng.random() < 0.5, loc=True) for g in groups])


def _t_there_is(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    if len(scene) == 1:
        return "there is " + _group_phrase(groups[0], rng, size=True, loc=True)
    return f"there are {_count_shapes(scene)}, " + _join([_group_phrase(g, rng, False, False) for g in groups])


def _t_picture_of(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    opener = rng.choice(["a picture of", "an image of", "a photo showing", "a drawing of"])
    return f"{opener} " + _join([_group_phrase(g, rng, size=False, loc=False) for g in groups])


def _t_background(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    items = _join([_group_phrase(g, rng, size=False, loc=False) for g in groups])
    return rng.choice([f"{items} on a grey background", f"a grey background with {items}"])


def _t_relation(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    if len(groups) < 2:
        g = groups[0]
        if len(g.cells) == 1:
            return f"only one {g.colour} {g.kind} " + rng.choice(LOCATIONS[g.cells[0]])
        return _group_phrase(g, rng, size=True, loc=True)
    g1, g2 = rng.sample(groups, 2)
    c1, c2 = rng.choice(g1.cells), rng.choice(g2.cells)
    # With a counted group, "the red circle" would be ambiguous, so say "a".
    d1 = "the" if len(g1.cells) == 1 else "a"
    d2 = "the" if len(g2.cells) == 1 else "a"
    return f"{d1} {g1.colour} {g1.kind} is {_relation(c1, c2)} {d2} {g2.colour} {g2.kind}"


def _t_colour_positions(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    parts = [f"{_article(s.colour)} {s.colour} shape {rng.choice(LOCATIONS[s.cell])}" for s in scene]
    return _join(parts)


def _t_shape_is_colour(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    kinds = [s.kind for s in scene]
    parts = []
    for g in groups:
        if kinds.count(g.kind) == len(g.cells):  # the shape kind alone identifies this group
            noun = g.kind if len(g.cells) == 1 else PLURALS[g.kind]
            verb = "is" if len(g.cells) == 1 else "are"
            parts.append(f"the {noun} {verb} {g.colour}")
        else:
            parts.append(f"one {g.kind} is {g.colour}")
    return _join(parts)


def _t_sizes(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    return _join([_group_phrase(g, rng, size=True, loc=False) for g in groups])


def _t_location_first(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    parts = [f"{rng.choice(LOCATIONS[s.cell])} {_article(s.colour)} {s.colour} {s.kind}" for s in scene]
    return ", ".join(parts)


def _t_count(scene: list[Shape], groups: list[Group], rng: random.Random) -> str:
    items = _join([_group_phrase(g, rng, size=rng.random() < 0.5, loc=rng.random() < 0.5) for g in groups])
    return f"{_count_shapes(scene)}, {items}"


TEMPLATES: list[Template] = [
    _t_list_positions,
    _t_there_is,
    _t_picture_of,
    _t_background,
    _t_relation,
    _t_colour_positions,
    _t_shape_is_colour,
    _t_sizes,
    _t_location_first,
    _t_count,
]


def _captions(scene: list[Shape], n: int, rng: random.Random) -> list[str]:
    groups = _groups(scene)
    captions: list[str] = []
    # Distinct templates first, so the captions of one image differ in wording, not just in a word.
    order = rng.sample(TEMPLATES, len(TEMPLATES))
    attempts = 0
    while len(captions) < n:
        template = order[len(captions) % len(order)] if attempts < len(order) else rng.choice(TEMPLATES)
        text = template(scene, groups, rng)
        attempts += 1
        # Duplicates are tolerated only after many tries (possible for tiny scenes and large n).
        if text not in captions or attempts > 20 * n:
            captions.append(text)
    return captions


# ----------------------------------------------------------------------------- dataset files


def _tokens(text: str) -> list[str]:
    """Split like BERT's basic tokenizer does for ASCII text: words, and each punctuation mark alone."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text)


def make_synthetic_dataset(
    out_dir: str,
    num_train_images: int = 200,
    num_val_images: int = 50,
    num_test_images: int = 50,
    captions_per_image: int = 5,
    image_size: int = 64,
    seed: int = 0,
    num_shapes: int | None = None,
    style: str = "filled",
) -> dict[str, str]:
    """Write a synthetic retrieval dataset under ``out_dir`` and return its paths.

    Returns a dict with ``image_root``, ``ann_root``, ``train_file``, ``val_file``, ``test_file`` and
    ``vocab_file``. The output depends only on the arguments (same seed, same bytes). ``num_shapes`` fixes
    the number of shapes per image (1-3); by default it varies. ``style``: ``filled`` shapes or their ``outline``
    only (the same scenes and captions for the same seed: a visual domain shift with nothing else changed).
    """
    if num_shapes is not None and not 1 <= num_shapes <= 3:
        raise ValueError(f"num_shapes must be 1, 2 or 3, got {num_shapes}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels for the shapes to be drawable, got {image_size}")
    image_root = os.path.join(out_dir, "images")
    ann_root = os.path.join(out_dir, "annotations")
    os.makedirs(ann_root, exist_ok=True)
    paths = {"image_root": image_root, "ann_root": ann_root}
    vocab: set[str] = set()
    counts = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
    generator = {
        "seed": seed,
        "num_shapes": num_shapes,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "counts": counts,
        "style": style,
    }
    for split in counts:
        os.makedirs(os.path.join(image_root, split), exist_ok=True)
        records: list[dict[str, object]] = []
        for i, (_, image, captions) in enumerate(generate_split(generator, split)):
            rel = f"{split}/{i:05d}.png"
            image.save(os.path.join(image_root, rel))
            for cap in captions:
                vocab.update(_tokens(pre_caption(cap)))
            if split == "train":
                records.extend({"image": rel, "caption": cap, "image_id": f"synth_{split}_{i}"} for cap in captions)
            else:
                records.append({"image": rel, "caption": captions})
        ann_file = os.path.join(ann_root, f"synthetic_{split}.json")
        with open(ann_file, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        paths[f"{split}_file"] = ann_file
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL_TOKENS + sorted(vocab)) + "\n")
    paths["vocab_file"] = vocab_file
    # The generator's arguments, so that the scenes behind the captions can be replayed (generate_split).
    with open(os.path.join(out_dir, GENERATOR_FILE), "w", encoding="utf-8") as f:
        json.dump(generator, f, indent=1)
    return paths


def config_keys(paths: dict[str, str]) -> dict[str, str]:
    """The config keys that point a `dataset: custom` config at a `make_synthetic_dataset` output."""
    return {
        "dataset": "custom",
        "image_root": paths["image_root"],
        "train_file": paths["train_file"],
        "val_file": paths["val_file"],
        "test_file": paths["test_file"],
        "text_encoder": paths["vocab_file"],
    }


GENERATOR_FILE = "generator.json"
STYLES = ("filled", "outline")
SPLITS = ("train", "val", "test")


def generate_split(generator: dict, split: str) -> Iterator[tuple[list[Shape], Image.Image, list[str]]]:
    """(scene, image, captions) of every image of `split`, for the arguments `make_synthetic_dataset` wrote to
    generator.json: the same RNG streams, so a replay gives the very scenes behind a written dataset."""
    # Per-split RNGs: changing the number of train images leaves val and test unchanged.
    rng = random.Random(f"synthetic-{generator['seed']}-{split}")
    np_rng = np.random.default_rng([generator["seed"], SPLITS.index(split)])
    for _ in range(generator["counts"][split]):
        scene = _sample_scene(rng, generator["num_shapes"])
        # generator.json files written before `style` existed hold filled shapes
        image = _render(scene, generator["image_size"], rng, np_rng, generator.get("style", "filled"))
        yield scene, image, _captions(scene, generator["captions_per_image"], rng)


def true_captions(scene: list[Shape], draws_per_template: int = 300) -> set[str]:
    """Every caption the templates write for `scene` (each template drawn `draws_per_template` times with a
    fixed RNG, enough to cover its phrasings): a caption of another image in this set is true of this one."""
    rng, groups, captions = random.Random(1), _groups(scene), set()
    for template in TEMPLATES:
        for _ in range(draws_per_template):
            captions.add(template(scene, groups, rng))
    return captions


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; prints the written paths as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=200, help="train images")
    parser.add_argument("--num-val", type=int, default=50, help="val images")
    parser.add_argument("--num-test", type=int, default=50, help="test images")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-shapes", type=int, default=None, choices=[1, 2, 3], help="shapes per image (default: 1-3, varying)"
    )
    parser.add_argument(
        "--style",
        default="filled",
        choices=STYLES,
        help="filled shapes, or their outline only: the same scenes and captions (a visual domain shift)",
    )
    args = parser.parse_args(argv)
    paths = make_synthetic_dataset(
        args.out,
        num_train_images=args.num_train,
        num_val_images=args.num_val,
        num_test_images=args.num_test,
        captions_per_image=args.captions_per_image,
        image_size=args.image_size,
        seed=args.seed,
        num_shapes=args.num_shapes,
        style=args.style,
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

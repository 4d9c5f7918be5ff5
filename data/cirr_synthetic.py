"""Generate a small dataset in the CIRR release format from the coloured-shapes scenes of data/synthetic.py.

Each subset is a chain of six scenes: the first is a random scene, and each next one applies one modification to
the previous (recolour, reshape, add, remove, move or resize a shape). Its five consecutive pairs are the queries,
each with a modification text that states the change ("the red circle is blue", "with a small green square in
the top left corner", "only the blue square"). The six images are the pairs' `img_set.members`, so a subset's
images differ by one to five changes: the near misses that Recall_subset ranks.

Layout under ``out``, as in the CIRR release (images under img_raw/, val images in dev/):
  captions/cap.rc2.{train,val,test1}.json        test1 without target_hard / target_soft; as in the release, some
                                                 target_soft also grade another member -1.0 (not a target)
  image_splits/split.rc2.{train,val,test1}.json  the gallery: every member image of the split
  img_raw/train/<k>/train-<s>-<m>-img0.png, img_raw/dev/dev-<s>-<m>-img0.png, img_raw/test1/...
      plus two images per split that no split file lists (the gallery is not every image on disk)
  vocab.txt                                      a WordPiece vocab of every token (merged with --extra-vocab)

Usage: ``python -m data.cirr_synthetic --out DIR [--num-train 120 --num-val 30 --num-test 20 --extra-vocab V]``
"""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np

from data.cirr import captions_path, image_split_path
from data.synthetic import COLOURS, LOCATIONS, SHAPES, SIZES, SPECIAL_TOKENS, Shape, _render, _sample_scene, _tokens
from data.utils import pre_caption

SPLIT_FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}
MEMBERS = 6
NUM_DISTRACTORS = 2


def _name(shape: Shape, scene: list[Shape], rng: random.Random) -> str:
    """'the red circle', with its place added when an identical-looking shape would make it ambiguous."""
    twins = [s for s in scene if s.kind == shape.kind and s.colour == shape.colour]
    text = f"the {shape.colour} {shape.kind}"
    return f"{text} {rng.choice(LOCATIONS[shape.cell])}" if len(twins) > 1 else text


def _modify(scene: list[Shape], rng: random.Random) -> tuple[list[Shape], str]:
    """One random change of the scene and the text that states it.

    The texts say what is true of the target ("the red circle is blue", "with a small green square at the top",
    "only the blue square"), in the words of data.synthetic's captions, so that a retrieval model trained on those
    captions (`make demo`) knows every token of them.
    """
    used_cells = {s.cell for s in scene}
    free_cells = sorted(set(LOCATIONS) - used_cells)
    free_colours = sorted(set(COLOURS) - {s.colour for s in scene})
    ops = ["recolour", "reshape", "move", "resize"] + (["add"] if len(scene) < 3 else [])
    ops += ["remove"] if len(scene) > 1 else []
    op = rng.choice(ops)
    if op == "add":
        new = Shape(rng.choice(SHAPES), rng.choice(free_colours), rng.choice(sorted(SIZES)), rng.choice(free_cells))
        where = rng.choice(LOCATIONS[new.cell])
        article = "an" if new.size[0] in "aeiou" else "a"
        return scene + [new], f"{rng.choice(['with', 'and'])} {article} {new.size} {new.colour} {new.kind} {where}"
    i = rng.randrange(len(scene))
    old = scene[i]
    name = _name(old, scene, rng)
    rest = scene[:i] + scene[i + 1 :]
    if op == "remove":
        return rest, "only " + " and ".join(_name(s, rest, rng) for s in rest)
    if op == "recolour":
        new = Shape(old.kind, rng.choice(free_colours), old.size, old.cell)
        text = f"{name} is {new.colour}"
    elif op == "reshape":
        new = Shape(rng.choice([k for k in SHAPES if k != old.kind]), old.colour, old.size, old.cell)
        text = f"{name} is a {new.kind}"
    elif op == "move":
        new = Shape(old.kind, old.colour, old.size, rng.choice(free_cells))
        text = f"{name} is {rng.choice(LOCATIONS[new.cell])}"
    else:  # resize
        new = Shape(old.kind, old.colour, "large" if old.size == "small" else "small", old.cell)
        text = f"{name} is {new.size}"
    return rest[:i] + [new] + rest[i:], text


def _chain(rng: random.Random) -> tuple[list[list[Shape]], list[str]]:
    """Six distinct scenes, each one modification away from the previous, and the five modification texts."""
    while True:
        scenes, texts = [_sample_scene(rng)], []
        while len(scenes) < MEMBERS:
            scene, text = _modify(scenes[-1], rng)
            scenes.append(scene)
            texts.append(text)
        if len({frozenset(s) for s in scenes}) == MEMBERS:  # a change undone later would repeat an image
            return scenes, texts


def _write_split(
    out_dir: str, split: str, count: int, seed: int, image_size: int, first_pairid: int, vocab: set[str]
) -> int:
    """Write one split's images, captions and image-split files; returns the next free pair id."""
    image_root = os.path.join(out_dir, "img_raw")
    rng = random.Random(f"cirr-synthetic-{seed}-{split}")
    np_rng = np.random.default_rng([seed, list(SPLIT_FOLDERS).index(split)])
    prefix = SPLIT_FOLDERS[split]
    images: dict[str, str] = {}
    pairs: list[dict] = []

    def save(name: str, scene: list[Shape], subset: int, listed: bool) -> None:
        folder = f"./{prefix}/{subset % 4}" if split == "train" else f"./{prefix}"  # train has sub-folders
        rel = f"{folder}/{name}.png"
        os.makedirs(os.path.join(image_root, folder), exist_ok=True)
        _render(scene, image_size, rng, np_rng).save(os.path.join(image_root, rel))
        if listed:
            images[name] = rel

    pairid = first_pairid
    for s in range(count):
        scenes, texts = _chain(rng)
        names = [f"{prefix}-{s}-{m}-img0" for m in range(MEMBERS)]
        for name, scene in zip(names, scenes, strict=True):
            save(name, scene, s, listed=True)
        members = rng.sample(names, MEMBERS)  # the release lists members in no particular order
        for k, text in enumerate(texts):
            vocab.update(_tokens(pre_caption(text)))
            pair: dict = {"pairid": pairid, "reference": names[k]}
            img_set: dict = {"id": s, "members": members, "reference_rank": members.index(names[k])}
            if split != "test1":
                soft = {names[k + 1]: 1.0}
                if k % 2 == 1:  # every other pair: the scene one further on, judged not a target (no rng draw)
                    soft[names[(k + 3) % MEMBERS]] = -1.0
                pair.update(target_hard=names[k + 1], target_soft=soft)
                img_set["target_rank"] = members.index(names[k + 1])
            pair.update(caption=text, img_set=img_set)
            pairs.append(pair)
            pairid += 1
    for d in range(NUM_DISTRACTORS):  # on disk, in no split file: must never enter the gallery
        save(f"{prefix}-unlisted-{d}-img0", _sample_scene(rng), 0, listed=False)
    for path, content in ((captions_path(out_dir, split), pairs), (image_split_path(out_dir, split), images)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
    return pairid


def make_cirr_dataset(
    out_dir: str,
    num_subsets: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    extra_vocab: list[str] | None = None,
) -> dict[str, str]:
    """Write the dataset (see the module docstring); returns {'ann_root', 'image_root', 'vocab_file'}.

    num_subsets: subsets per split (default train 120, val 30, test1 20); each holds 6 images and 5 pairs.
    """
    num_subsets = num_subsets or {"train": 120, "val": 30, "test1": 20}
    vocab: set[str] = set()
    pairid = 0  # unique over the splits, as in the release
    for split, count in num_subsets.items():
        pairid = _write_split(out_dir, split, count, seed, image_size, pairid, vocab)
    vocab.update(extra_vocab or [])
    vocab -= set(SPECIAL_TOKENS)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL_TOKENS + sorted(vocab)) + "\n")
    return {"ann_root": out_dir, "image_root": os.path.join(out_dir, "img_raw"), "vocab_file": vocab_file}


def config_keys(paths: dict[str, str]) -> dict[str, str]:
    """The config keys that point train_cirr.py at a `make_cirr_dataset` output."""
    return {
        "cirr_ann_root": paths["ann_root"],
        "cirr_image_root": paths["image_root"],
        "text_encoder": paths["vocab_file"],
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; prints the written paths as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=120, help="train subsets (5 pairs, 6 images each)")
    parser.add_argument("--num-val", type=int, default=30, help="val subsets")
    parser.add_argument("--num-test", type=int, default=20, help="test1 subsets")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extra-vocab",
        default=None,
        help="a vocab.txt whose tokens are added to ours (e.g. the captioned data a retrieval model was trained on)",
    )
    args = parser.parse_args(argv)
    extra = None
    if args.extra_vocab:
        with open(args.extra_vocab, encoding="utf-8") as f:
            extra = [line.strip() for line in f if line.strip()]
    paths = make_cirr_dataset(
        args.out,
        {"train": args.num_train, "val": args.num_val, "test1": args.num_test},
        image_size=args.image_size,
        seed=args.seed,
        extra_vocab=extra,
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

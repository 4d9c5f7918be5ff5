"""Image transforms for retrieval fine-tuning and evaluation.

Train: RandomResizedCrop (bicubic) + horizontal flip + RandomAugment(2, 5) + ToTensor + Normalize.
Eval: a plain square bicubic resize (no crop, aspect ratio not kept) + ToTensor + Normalize.
Both normalise with the CLIP statistics, which is what the BLIP checkpoints were trained with.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

MAX_LEVEL = 10
_GREY = 128


def _normalize() -> transforms.Normalize:
    return transforms.Normalize(CLIP_MEAN, CLIP_STD)


def test_transform(image_size: int) -> transforms.Compose:
    """Eval transform: resize to exactly ``image_size`` x ``image_size`` (bicubic), tensor, normalise."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            _normalize(),
        ]
    )


# pytest would otherwise try to collect this module-level function as a test when imported.
test_transform.__test__ = False  # type: ignore[attr-defined]


def train_transform(image_size: int, min_scale: float = 0.5) -> transforms.Compose:
    """Train transform: random resized crop, flip, RandomAugment(2, 5), tensor, normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            RandomAugment(num_ops=2, magnitude=5),
            transforms.ToTensor(),
            _normalize(),
        ]
    )


# ---------------------------------------------------------------------------------------------
# RandomAugment operations. Each takes a PIL image and a level in [0, MAX_LEVEL] and returns a
# PIL image of the same size and mode. Signs are drawn from `random` so that seeding python's RNG
# (which DataLoader does per worker) makes the augmentation reproducible.
# ---------------------------------------------------------------------------------------------


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    bands = len(img.getbands())
    return _GREY if bands == 1 else (_GREY,) * bands


def _random_sign(value: float) -> float:
    return -value if random.random() > 0.5 else value


def _enhance_factor(level: float) -> float:
    # Maps level 0..10 to 0.1..1.9; level 5 gives exactly 1.0, i.e. the op is a no-op at the
    # default magnitude. That is the reference behaviour and is kept on purpose.
    return level / MAX_LEVEL * 1.8 + 0.1


def identity(img: Image.Image, level: float) -> Image.Image:
    """Return the image unchanged."""
    return img


def auto_contrast(img: Image.Image, level: float) -> Image.Image:
    """Stretch each channel linearly so its minimum maps to 0 and its maximum to 255."""
    arr = np.asarray(img)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    out = np.empty_like(arr)
    for c in range(arr.shape[2]):
        channel = arr[:, :, c]
        lo, hi = int(channel.min()), int(channel.max())
        if hi > lo:
            # A lookup table keeps this one pass over the pixels whatever the image size. Integer
            # floor division truncates like the reference's float->uint8 cast, but maps hi to
            # exactly 255 (the float product can land on 254.999...).
            lut = (np.clip(np.arange(256) - lo, 0, None) * 255 // (hi - lo)).clip(0, 255).astype(np.uint8)
            out[:, :, c] = lut[channel]
        else:
            out[:, :, c] = channel  # a flat channel has nothing to stretch
    return Image.fromarray(out[:, :, 0] if squeeze else out, mode=img.mode)


def equalize(img: Image.Image, level: float) -> Image.Image:
    """Histogram-equalise each channel independently."""
    # PIL equalises band by band, which is the per-channel behaviour the reference targets.
    return ImageOps.equalize(img)


def brightness(img: Image.Image, level: float) -> Image.Image:
    """Scale brightness by ``level/10*1.8+0.1`` (1.0, a no-op, at level 5)."""
    factor = _enhance_factor(level)
    if factor == 1.0:
        return img  # blending with weight 1.0 returns the input; skip the work
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, level: float) -> Image.Image:
    """Blend with a smoothed copy by ``level/10*1.8+0.1`` (1.0, a no-op, at level 5)."""
    factor = _enhance_factor(level)
    if factor == 1.0:
        return img
    return ImageEnhance.Sharpness(img).enhance(factor)


def _affine(img: Image.Image, forward: tuple[float, float, float, float, float, float]) -> Image.Image:
    """Apply the forward affine map ``(a, b, c, d, e, f)``: x' = a x + b y + c, y' = d x + e y + f.

    PIL's AFFINE transform wants the inverse map (output pixel -> input pixel), so invert here;
    that keeps each op written in the natural "move the content by" direction.
    """
    a, b, c, d, e, f = forward
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        (ia, ib, ic, id_, ie, if_),
        resample=Image.Resampling.BILINEAR,
        fillcolor=_fill(img),
    )


def shear_x(img: Image.Image, level: float) -> Image.Image:
    """Shear horizontally by ±0.3*level/10 about the top-left origin."""
    s = _random_sign(0.3 * level / MAX_LEVEL)
    return _affine(img, (1.0, s, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: Image.Image, level: float) -> Image.Image:
    """Shear vertically by ±0.3*level/10 about the top-left origin."""
    s = _random_sign(0.3 * level / MAX_LEVEL)
    return _affine(img, (1.0, 0.0, 0.0, s, 1.0, 0.0))


def translate_x(img: Image.Image, level: float) -> Image.Image:
    """Shift horizontally by ±10*level/10 pixels, filling with grey."""
    t = _random_sign(10.0 * level / MAX_LEVEL)
    return _affine(img, (1.0, 0.0, t, 0.0, 1.0, 0.0))


def translate_y(img: Image.Image, level: float) -> Image.Image:
    """Shift vertically by ±10*level/10 pixels, filling with grey."""
    t = _random_sign(10.0 * level / MAX_LEVEL)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, t))


def rotate(img: Image.Image, level: float) -> Image.Image:
    """Rotate by ±30*level/10 degrees about the centre, filling with grey."""
    degrees = _random_sign(30.0 * level / MAX_LEVEL)
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=_fill(img))


AUGMENT_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "Equalize": equalize,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


class RandomAugment:
    """RandAugment as used by BLIP: ``num_ops`` ops drawn uniformly with replacement.

    Each drawn op is applied with probability 0.5 at level ``magnitude`` (out of 10).
    Takes and returns a PIL image, so ToTensor can follow it.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 5, ops: list[str] | None = None) -> None:
        names = list(AUGMENT_OPS) if ops is None else ops
        unknown = [n for n in names if n not in AUGMENT_OPS]
        if unknown:
            raise ValueError(f"Unknown RandomAugment ops {unknown}; valid: {sorted(AUGMENT_OPS)}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandomAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = names

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(self.ops, k=self.num_ops):
            if random.random() < 0.5:
                img = AUGMENT_OPS[name](img, self.magnitude)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude})"

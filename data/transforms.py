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

from configs.schema import CONFIG_CHOICES

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

MAX_LEVEL = 10
AugmentOp = Callable[[Image.Image, float], Image.Image]  # (image, level) -> image of the same size and mode
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


TRAIN_AUGMENTS = CONFIG_CHOICES["train_augment"]


def train_transform(
    image_size: int, min_scale: float = 0.5, autocontrast: str = "official", augment: str = "official"
) -> transforms.Compose:
    """Train transform: random resized crop, flip, RandomAugment(2, 5), tensor, normalise.

    ``autocontrast`` picks RandomAugment's AutoContrast: ``official`` or ``fixed`` (see ``auto_contrast``).
    ``augment`` (config key ``train_augment``): ``official`` is the above; ``crop`` keeps only the random resized
    crop; ``none`` is the eval transform. The official augmentation suits photos and their captions, which rarely
    depend on left/right or exact colours; it falsifies captions that do (the generated shapes data: a flip swaps
    "on the left" and "on the right", RandomAugment's colour ops repaint the shapes).
    """
    if augment not in TRAIN_AUGMENTS:
        raise ValueError(f"train_augment must be one of {TRAIN_AUGMENTS}, got {augment!r}")
    if augment == "none":
        return test_transform(image_size)
    crop = transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC)
    if augment == "crop":
        return transforms.Compose([crop, transforms.ToTensor(), _normalize()])
    return transforms.Compose(
        [
            crop,
            transforms.RandomHorizontalFlip(),
            RandomAugment(num_ops=2, magnitude=5, autocontrast=autocontrast),
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


def _per_channel(img: Image.Image, lut_for: Callable[[int, int], np.ndarray]) -> Image.Image:
    """Map each channel through the 256-entry table ``lut_for(min, max)``; a flat channel is left as is.

    A lookup table keeps this one pass over the pixels whatever the image size.
    """
    arr = np.asarray(img)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    out = np.empty_like(arr)
    for c in range(arr.shape[2]):
        channel = arr[:, :, c]
        lo, hi = int(channel.min()), int(channel.max())
        # A flat channel has nothing to stretch; the official code also returns it unchanged.
        out[:, :, c] = lut_for(lo, hi)[channel] if hi > lo else channel
    return Image.fromarray(out[:, :, 0] if squeeze else out, mode=img.mode)


def _official_autocontrast_lut(lo: int, hi: int) -> np.ndarray:
    """The official AutoContrast table for a channel with minimum ``lo`` < maximum ``hi``, bug included.

    The official code computes ``scale = 255 / (high - low)`` and ``offset = -low * scale`` with ``low`` an
    np.uint8 scalar, so ``-low`` wraps modulo 256 (low=10 gives 246) before the product is taken in float64.
    Written out with Python ints so that it does not depend on numpy's scalar promotion rules:

        table[v] = uint8(clip(v * s + ((256 - lo) % 256) * s, 0, 255)),  s = 255 / (hi - lo),  v = 0..255

    in float64, the cast truncating. With lo = 0 the offset is 0 and the channel is stretched (though
    ``hi * s`` can land just below 255, e.g. 25 * (255 / 25) = 254.99999999999997, giving 254). With lo > 0
    the offset (256 - lo) * 255 / (hi - lo) exceeds 255 (as hi - lo < 256 - lo), so the whole channel becomes
    255.
    """
    scale = 255 / (hi - lo)
    offset = ((256 - lo) % 256) * scale
    return np.clip(np.arange(256, dtype=np.float64) * scale + offset, 0, 255).astype(np.uint8)


def _fixed_autocontrast_lut(lo: int, hi: int) -> np.ndarray:
    """The intended stretch: ``lo`` maps to 0 and ``hi`` to 255, linearly, rounding down."""
    # Integer floor division truncates like the official float->uint8 cast, but maps hi to exactly 255
    # (the float product can land on 254.999...).
    return (np.clip(np.arange(256) - lo, 0, None) * 255 // (hi - lo)).clip(0, 255).astype(np.uint8)


def auto_contrast(img: Image.Image, level: float) -> Image.Image:
    """AutoContrast exactly as the official BLIP code computes it (the default).

    Because of a uint8 wrap-around in the official offset (see ``_official_autocontrast_lut``), only channels
    whose minimum is 0 are stretched; every channel whose minimum is above 0 becomes all 255. ``level`` is
    unused, as in the official op.
    """
    return _per_channel(img, _official_autocontrast_lut)


def auto_contrast_fixed(img: Image.Image, level: float) -> Image.Image:
    """AutoContrast as intended (``autocontrast: fixed``, a fix of the official bug): stretch each channel
    linearly so its minimum maps to 0 and its maximum to 255. ``level`` is unused."""
    return _per_channel(img, _fixed_autocontrast_lut)


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


AUGMENT_OPS: dict[str, AugmentOp] = {
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
# The variants of the "AutoContrast" op, by the value of the config key ``autocontrast``.
AUTOCONTRAST_MODES: dict[str, AugmentOp] = {
    "official": auto_contrast,
    "fixed": auto_contrast_fixed,
}


class RandomAugment:
    """RandAugment as used by BLIP: ``num_ops`` ops drawn uniformly with replacement.

    Each drawn op is applied with probability 0.5 at level ``magnitude`` (out of 10). ``autocontrast``
    (official | fixed) selects the AutoContrast variant (see ``auto_contrast``).
    Takes and returns a PIL image, so ToTensor can follow it.
    """

    def __init__(
        self, num_ops: int = 2, magnitude: float = 5, ops: list[str] | None = None, autocontrast: str = "official"
    ) -> None:
        names = list(AUGMENT_OPS) if ops is None else ops
        unknown = [n for n in names if n not in AUGMENT_OPS]
        if unknown:
            raise ValueError(f"Unknown RandomAugment ops {unknown}; valid: {sorted(AUGMENT_OPS)}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandomAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}")
        if autocontrast not in AUTOCONTRAST_MODES:
            raise ValueError(f"Unknown autocontrast {autocontrast!r}; valid: {list(AUTOCONTRAST_MODES)}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = names
        self.autocontrast = autocontrast
        # The functions this instance applies, by op name: the registry with AutoContrast resolved here once.
        self.op_fns = {**AUGMENT_OPS, "AutoContrast": AUTOCONTRAST_MODES[autocontrast]}

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(self.ops, k=self.num_ops):
            if random.random() < 0.5:
                img = self.op_fns[name](img, self.magnitude)
        return img

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"autocontrast={self.autocontrast!r})"
        )

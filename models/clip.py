"""CLIP as a retrieval model beside BLIP: Hugging Face `CLIPModel` directories and open_clip models, behind the ITC
interface the evaluator and the trainer use, with each model's own preprocessing, tokenizer and context length.

Sources (`load_clip_model`):
- a Hugging Face CLIPModel directory (config.json, weights, tokenizer files, preprocessor_config.json): network,
  tokenizer and preprocessing all come from the directory; its config.json names the activation (`hidden_act`).
- open_clip: `clip_model` names the architecture (a built-in name such as ViT-B-16 or ViT-L-14-quickgelu, or the path
  of a model-config JSON, registered under its file stem) and `pretrained` is a local checkpoint file. An open_clip
  checkpoint does not record its activation, and OpenAI's weights need QuickGELU: loaded into a plain-GELU model they
  give wrong similarities without any error (open_clip issue 771). So the activation is part of the model's
  identity here: `clip_pretrained_tag` must say where the file came from (`openai`, `laion2b_s32b_b82k`, ... or
  `custom` for weights whose name already says it), and a tag whose weights were trained with the other activation
  than `clip_model` builds is a ConfigError that names the right model name. The tag also fixes the preprocessing
  (the laion2b ViT-L-14 weights normalise with mean = std = 0.5, the OpenAI ones with the CLIP statistics).
- one of our training checkpoints (`{'model': state dict, 'config': ...}` with `config['model'] == 'clip'`): the
  architecture comes from the config (`pretrained` / `clip_model`), the weights from the checkpoint.

Training (`ClipRetrieval.forward`, called by engine/training.py like BlipRetrieval) is ITC only: symmetric InfoNCE
over the global batch with the learnable logit scale (temperature) clamped to [0, ln 100] as open_clip does.
There is no ITM head: `has_itm` is False and the evaluator ranks by cosine alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from models.checkpoint import CheckpointError, safe_torch_load
from utils import ConfigError, UserError, all_gather_with_grad, get_rank, log

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learnable log scale to [0, ln 100] (temperature >= 0.01)
TRAIN_CROP_SCALE = (0.9, 1.0)  # open_clip's fine-tuning RandomResizedCrop scale (no flip: captions say left/right)
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_HF_RESAMPLE = {3: "bicubic", 2: "bilinear"}  # PIL resample codes in preprocessor_config.json


class ClipCheckpointError(UserError, RuntimeError):
    """A CLIP checkpoint that does not fit the model asked for; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------
# Preprocessing: each model's own resize, crop, normalisation and resolution
# ----------------------------------------------------------------------------------------------------


@dataclass
class ClipPreprocess:
    """How a CLIP model wants its images: `resize_mode` shortest (resize the short side to `size`, then centre crop
    `size`) or squash (resize to size x size), interpolation, and the normalisation statistics.

    `image_processor` is set for Hugging Face directories: evaluation images then go through the directory's own
    image processor (transformers' resize, centre crop with its floored offset, rescale, normalise), so the pixels
    are the ones transformers gives on the installed version; the other fields describe it and drive the training
    augmentation. open_clip models leave it None and use the torchvision transform below, which is open_clip's.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str | None = "bicubic"  # None: a resample the training transform cannot reproduce (HF only)
    resize_mode: str = "shortest"
    image_processor: Any = None

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATION and not (self.interpolation is None and self.image_processor):
            raise ConfigError(
                f"CLIP preprocessing: interpolation {self.interpolation!r} is not one of bicubic, bilinear"
            )
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"CLIP preprocessing: resize_mode {self.resize_mode!r} is not one of shortest, squash")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def transform(self, train: bool) -> Callable:
        """Eval: the HF image processor, or resize + centre crop (or squash), tensor, normalise. Train: open_clip's
        RandomResizedCrop with scale (0.9, 1), tensor, normalise."""
        if not train and self.image_processor is not None:
            return HfImageProcessorTransform(self.image_processor)
        if self.interpolation is None:
            raise ConfigError(
                "CLIP preprocessing: the Hugging Face directory's resample is not bilinear (2) or bicubic (3), which "
                "the training augmentation needs"
            )
        mode = _INTERPOLATION[self.interpolation]
        if train:
            geometry = [transforms.RandomResizedCrop(self.size, scale=TRAIN_CROP_SCALE, interpolation=mode)]
        elif self.resize_mode == "squash":
            geometry = [transforms.Resize((self.size, self.size), interpolation=mode)]
        else:
            geometry = [transforms.Resize(self.size, interpolation=mode), transforms.CenterCrop(self.size)]
        to_rgb = transforms.Lambda(lambda image: image.convert("RGB"))
        return transforms.Compose([to_rgb, *geometry, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])


class HfImageProcessorTransform:
    """A dataset transform that runs one PIL image through a transformers image processor: (3, H, W) float32."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HfImageProcessorTransform({type(self.image_processor).__name__})"


def hf_preprocess(path: str, image_size: int) -> ClipPreprocess:
    """The image processor of an HF directory (preprocessor_config.json, loaded by transformers' AutoImageProcessor
    as CLIPProcessor does) and the size, statistics and resample it uses; without that file, a CLIPImageProcessor
    with OpenAI's defaults at the vision tower's resolution."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{file}: transformers cannot load this image processor: {err}") from err
    else:
        log(f"{path}: no preprocessor_config.json; using the OpenAI CLIP preprocessing at {image_size} px")
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    crop = getattr(processor, "crop_size", None)
    if not getattr(processor, "do_center_crop", False) or not crop or crop["height"] != crop["width"]:
        raise ConfigError(
            f"{file}: the image processor must centre crop to a square (do_center_crop true, crop_size height = "
            f"width), so that every image has one size; got do_center_crop {getattr(processor, 'do_center_crop', None)}"
            f", crop_size {crop}"
        )
    resample = getattr(processor, "resample", None)
    return ClipPreprocess(
        size=int(crop["height"]),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=_HF_RESAMPLE.get(int(resample)) if resample is not None else None,
        image_processor=processor,
    )


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def clip_contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's unit features against the whole global batch: pair i of rank r is the
    positive of row i, every other image / text in the global batch a negative (open_clip's loss, local rows)."""
    all_image = all_gather_with_grad(image_feat)
    all_text = all_gather_with_grad(text_feat)
    labels = torch.arange(len(image_feat), device=image_feat.device) + get_rank() * len(image_feat)
    logits_per_image = logit_scale * image_feat @ all_text.t()
    logits_per_text = logit_scale * text_feat @ all_image.t()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _pooler_output(tower_output) -> torch.Tensor:
    """The pooled state of an HF CLIP tower: an output object's `pooler_output`, or item 1 of the tuple a config
    with return_dict false gives (the towers' return_dict argument exists only in some transformers versions)."""
    return tower_output.pooler_output if hasattr(tower_output, "pooler_output") else tower_output[1]


class ClipRetrieval(nn.Module):
    """A CLIP dual encoder (HF CLIPModel or open_clip CLIP in `net`) with its tokenizer and preprocessing.

    `identity` records what the model is (source, architecture, activation, resolution, context length); the
    evaluator writes it beside the metrics so a report can say which model each column is.
    """

    has_itm = False  # the evaluator ranks by ITC cosine alone

    def __init__(
        self, backend: str, net: nn.Module, tokenizer, preprocess: ClipPreprocess, context_length: int, identity: dict
    ):
        super().__init__()
        if backend not in ("hf", "open_clip"):
            raise ValueError(f"backend must be hf or open_clip, got {backend!r}")
        self.backend = backend
        self.net = net
        self.tokenizer = tokenizer  # not a module: not in the state dict
        self.preprocess = preprocess
        self.context_length = context_length
        self.identity = {**identity, "image_size": preprocess.size, "context_length": context_length}
        self.embed_dim = self.net.text_projection.out_features if backend == "hf" else self.net.text_projection.shape[1]

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log of the inverse temperature (exp(logit_scale) multiplies the cosines)."""
        return self.net.logit_scale

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    def image_transform(self, train: bool) -> Callable:
        return self.preprocess.transform(train)

    @torch.compiler.disable
    def tokenize(self, captions: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, truncated to the context length (77) with the end token kept."""
        device = device or self.logit_scale.device
        if self.backend == "hf":
            tokens = self.tokenizer(
                captions, padding="longest", truncation=True, max_length=self.context_length, return_tensors="pt"
            )
            return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        ids = self.tokenizer(captions)  # open_clip: (B, context_length), zero-padded, truncated with EOT kept
        return ids.to(device), (ids != 0).long().to(device)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit text vectors (B, embed_dim), float32."""
        if self.backend == "hf":
            # The text tower's pooled end-token state, then the projection: what get_text_features computes, called
            # part by part because its return type changed (a tensor up to transformers 4.x, an output object in 5.x)
            tower = self.net.text_model(input_ids=input_ids, attention_mask=attention_mask)
            feats = self.net.text_projection(_pooler_output(tower))
        else:  # open_clip pools at the end token (the highest id) and needs no mask
            feats = self.net.encode_text(input_ids)
        return F.normalize(feats.float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image vectors (B, embed_dim), float32."""
        if self.backend == "hf":
            tower = self.net.vision_model(pixel_values=images)  # as encode_text: the same on every version
            feats = self.net.visual_projection(_pooler_output(tower))
        else:
            feats = self.net.encode_image(images)
        return F.normalize(feats.float(), dim=-1)

    def similarity(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine matrix (n_images, n_captions), the score the evaluator ranks by."""
        return self.encode_image(images) @ self.encode_text(*self.tokenize(captions, images.device)).t()

    def forward(
        self,
        image: torch.Tensor,
        caption: list[str],
        alpha: float = 0.0,
        idx: torch.Tensor | None = None,
        hard_negative_fraction: float = 1.0,
        text_compute: str = "trimmed",
        update_queues: bool = True,
    ) -> dict:
        """Training step of engine/training.py (same call as BlipRetrieval; alpha, idx, the negatives and
        text_compute have no meaning here): {'loss' = 'loss_ita': symmetric InfoNCE, 'loss_itm': 0, 'itm_acc_pos',
        'itm_acc_neg': NaN (no ITM head), 'num_neg_fallback': 0, 'logit_scale'}."""
        with torch.no_grad():  # before use, so the value a step trains with is always in range
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        image_feat = self.encode_image(image)
        text_feat = self.encode_text(*self.tokenize(caption, image.device))
        loss = clip_contrastive_loss(image_feat, text_feat, self.logit_scale.exp())
        zero = loss.detach().new_zeros(())
        nan = torch.full_like(zero, float("nan"))
        return {
            "loss": loss,
            "loss_ita": loss,
            "loss_itm": zero,
            "itm_acc_pos": nan,
            "itm_acc_neg": nan,
            "num_neg_fallback": zero.long(),
            "logit_scale": self.logit_scale.detach().float(),
        }

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as open_clip: no weight decay on gains, biases, embeddings of rank < 2 and the logit scale."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exclude = p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") or ".ln" in name or "norm" in name
            (no_decay if exclude else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def is_hf_clip_directory(path: str) -> bool:
    """A directory whose config.json says model_type clip."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return False
    with open(file) as f:
        return json.load(f).get("model_type") == "clip"


def _hf_clip(path: str, config: dict, load_weights: bool) -> ClipRetrieval:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # heavy: only when an HF CLIP is asked for

    hf_config = CLIPConfig.from_pretrained(path)
    try:
        net = CLIPModel.from_pretrained(path) if load_weights else CLIPModel(hf_config)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ClipCheckpointError(f"cannot load the Hugging Face CLIP directory {path}: {err}") from err
    context = min(config["clip_context_length"], hf_config.text_config.max_position_embeddings)
    identity = {
        "model": "clip",
        "source": "hf",
        "name": os.path.basename(os.path.normpath(path)),
        "activation": hf_config.vision_config.hidden_act,
    }
    return ClipRetrieval(
        "hf", net, tokenizer, hf_preprocess(path, hf_config.vision_config.image_size), context, identity
    )


def _open_clip_name(config: dict) -> str:
    """The open_clip model name of `clip_model`; a JSON path is registered under its file stem first."""
    import open_clip

    name = config["clip_model"]
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise ConfigError(f"config key 'clip_model': model-config file not found: {name}")
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    if open_clip.get_model_config(name) is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ConfigError(
            f"config key 'clip_model': {name!r} is not an open_clip model"
            + (f"; did you mean {close}?" if close else "")
        )
    return name


def expected_quick_gelu(name: str, tag: str) -> bool | None:
    """Whether weights published under `tag` for architecture `name` were trained with QuickGELU; None for
    `custom` (the name is trusted). OpenAI's CLIP weights always use QuickGELU."""
    import open_clip

    if tag == "custom":
        return None
    base = name.removesuffix("-quickgelu")
    for candidate in (name, base):
        published = open_clip.get_pretrained_cfg(candidate, tag)
        if published:
            return bool(published.get("quick_gelu", False))
    if tag == "openai":
        return True
    known = sorted(
        set(open_clip.list_pretrained_tags_by_model(base)) | set(open_clip.list_pretrained_tags_by_model(name))
    )
    raise ConfigError(
        f"config key 'clip_pretrained_tag': {tag!r} is not a published tag of {name}"
        + (f" (known: {', '.join(known)})" if known else "")
        + "; use one of those, openai, or custom for weights whose activation the model name already states"
    )


def check_activation(name: str, quick_gelu: bool, tag: str) -> None:
    """Refuse an architecture whose activation differs from the one the tagged weights were trained with."""
    expected = expected_quick_gelu(name, tag)
    if expected is None or expected == quick_gelu:
        return
    if expected:
        fix = f"set clip_model: {name}-quickgelu" if not name.endswith("-quickgelu") else 'set "quick_gelu": true'
    else:
        fix = f"set clip_model: {name.removesuffix('-quickgelu')}"
    raise ConfigError(
        f"config key 'clip_model': {name} uses {'QuickGELU' if quick_gelu else 'GELU'}, but weights tagged {tag!r} "
        f"were trained with {'QuickGELU' if expected else 'GELU'}; they would load without error and give wrong "
        f'similarities. {fix} (or, for a model-config JSON, its "quick_gelu" key)'
    )


def _open_clip(config: dict, checkpoint: str, load_weights: bool) -> ClipRetrieval:
    import open_clip

    name = _open_clip_name(config)
    model_cfg = open_clip.get_model_config(name)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    tag = config["clip_pretrained_tag"]
    if checkpoint and not tag:
        raise ConfigError(
            f"config key 'clip_pretrained_tag' is empty, but open_clip weights are loaded from {checkpoint}: name the "
            "tag the file was published under (openai, laion2b_s32b_b82k, ...) or custom, so that the activation "
            "(QuickGELU for OpenAI's weights) can be checked"
        )
    if tag:
        check_activation(name, quick_gelu, tag)
    context = config["clip_context_length"]
    net = open_clip.create_model(name, pretrained=None, force_context_length=context)
    if checkpoint and load_weights:
        if not os.path.isfile(checkpoint):
            raise ClipCheckpointError(f"open_clip checkpoint not found: {checkpoint}")
        try:
            open_clip.load_checkpoint(net, checkpoint, strict=True)
        except (RuntimeError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0]
            raise ClipCheckpointError(f"{checkpoint} does not fit open_clip model {name}: {first}") from err
        log(f"loaded open_clip {name} weights from {checkpoint} (tag {tag})")
    published = open_clip.get_pretrained_cfg(name.removesuffix("-quickgelu"), tag) if tag else {}
    preprocess_cfg = open_clip.transform.merge_preprocess_dict(net.visual.preprocess_cfg, published)
    size = preprocess_cfg["size"]
    preprocess = ClipPreprocess(
        size=size if isinstance(size, int) else size[0],
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
        interpolation=preprocess_cfg["interpolation"],
        resize_mode=preprocess_cfg["resize_mode"],
    )
    tokenizer = open_clip.get_tokenizer(name, context_length=context)
    identity = {
        "model": "clip",
        "source": "open_clip",
        "name": name,
        "tag": tag,
        "activation": "quick_gelu" if quick_gelu else "gelu",
    }
    return ClipRetrieval("open_clip", net, tokenizer, preprocess, context, identity)


def _own_checkpoint(path: str, allow_unsafe: bool = False) -> dict | None:
    """The state dict of one of our CLIP training checkpoints, or None for any other file.

    Pickled files go through the safe reader first, also those open_clip reads afterwards (older open_clip
    releases unpickle fully): a file that needs full unpickling is refused unless `allow_unsafe`.
    """
    if path.endswith(".safetensors"):
        return None  # open_clip reads it; safetensors holds tensors only
    try:
        obj = safe_torch_load(path)
    except CheckpointError as err:
        if "refused to unpickle" in str(err) and not allow_unsafe:
            raise
        return None  # not a torch pickle (open_clip's other formats), or trusted by the user: open_clip reads it
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj:
        if obj["config"].get("model") != "clip":
            raise ClipCheckpointError(
                f"{path} is a training checkpoint of model {obj['config'].get('model', 'blip')!r}, not clip; set "
                "model: blip to evaluate it"
            )
        return obj["model"]
    return None


def load_clip_state(model: ClipRetrieval, state: dict, source: str) -> None:
    """Load one of our checkpoints' state dicts; every key must match (the architecture comes from the config)."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ClipCheckpointError(
            f"{source} does not match the CLIP model built from the config ({model.identity['name']}): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    log(f"loaded {len(state)} tensors from {source}")


def load_clip_model(
    config: dict, source: str | None = None, load_weights: bool = True, allow_unsafe: bool = False
) -> ClipRetrieval:
    """Build the CLIP model of `config` (model: clip) and load `source` (default: `pretrained`) into it.

    `source` is an HF CLIPModel directory, an open_clip checkpoint file (with `clip_model`, `clip_pretrained_tag`),
    one of our training checkpoints (architecture from `pretrained` / `clip_model`), or '' for a randomly
    initialised open_clip `clip_model`. `load_weights=False` builds the architecture only (a resumed run).
    `config` is not changed: the model's resolution (`model.image_size`) is the config update the caller applies
    (models/loading.py returns it as `config_updates['image_size']`). `allow_unsafe`: see `_own_checkpoint`.
    """
    source = config["pretrained"] if source is None else source
    path = os.path.expanduser(source) if source else ""
    own_state = _own_checkpoint(path, allow_unsafe) if os.path.isfile(path) else None
    base = os.path.expanduser(config["pretrained"]) if own_state is not None else path
    if base and os.path.isdir(base):
        if not is_hf_clip_directory(base):
            raise ClipCheckpointError(f"{base} is not a Hugging Face CLIPModel directory (config.json model_type clip)")
        model = _hf_clip(base, config, load_weights and own_state is None)
    elif config["clip_model"]:
        model = _open_clip(config, base, load_weights and own_state is None)
    elif base:
        raise ConfigError(
            f"model: clip with pretrained {base!r}: a file is an open_clip checkpoint and needs config key "
            "'clip_model' (the architecture, e.g. ViT-B-16-quickgelu); a Hugging Face CLIP is a directory"
        )
    else:
        raise ConfigError(
            "model: clip needs `pretrained` (an HF CLIPModel directory or open_clip checkpoint file) or `clip_model` "
            "(an open_clip architecture, for random initialisation)"
        )
    if own_state is not None:
        load_clip_state(model, own_state, path)
    elif not source:
        log(f"CLIP {model.identity['name']}: randomly initialised (no pretrained weights)")
    log(
        f"CLIP {model.identity['source']} {model.identity['name']}: {model.image_size} px, context "
        f"{model.context_length} tokens, activation {model.identity['activation']}"
    )
    return model


def dataset_transform(model: nn.Module, train: bool) -> Callable | None:
    """The image transform a dataset must use for `model`: CLIP's own, or None (BLIP's, from the config keys)."""
    return model.image_transform(train) if isinstance(model, ClipRetrieval) else None

"""Checkpoint loading and export for BlipRetrieval.

Sources understood by `load_model` (design.md section 3):
- official BLIP `.pth` files (pre-trained or retrieval fine-tuned, base or large), local or http(s) URL;
- our own training checkpoints (`{'model': ..., 'optimizer': ..., 'config': ..., 'epoch': ...}`, same keys);
- a raw state dict (official key names, or Hugging Face names, which are converted);
- a Hugging Face `BlipForImageTextRetrieval` directory (config.json + model.safetensors / pytorch_model.bin +
  tokenizer files): the architecture and the tokenizer come from the directory.

Unlike the official loader, which deletes shape-mismatched keys and loads with strict=False, every load here
classifies each key as loaded / missing / unexpected / shape-mismatched, names the ones that are expected and
harmless (and why), and raises `CheckpointError` when a mismatch is not one of those or when most of the model
would stay at its random initialisation (usually a ViT-L checkpoint in a ViT-B model, or the wrong model).

Pickle trust rule: files are read with `torch.load(weights_only=True)`. Official BLIP checkpoints also pickle the
training config and optimizer state, which that mode may refuse; full unpickling (`weights_only=False`, which can
execute code) is then allowed only for local files (the user chose to put them there) and for URLs under
`OFFICIAL_URL_PREFIX` (Salesforce's storage), and one log line says so. Any other URL is refused with a message
explaining how to download the file by hand and pass the local path if it is trusted.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from models.blip_retrieval import BlipRetrieval, build_model, init_tokenizer
from models.med import MedConfig
from models.vit import VIT_SIZES
from utils import barrier, is_dist_initialized, log

OFFICIAL_URL_PREFIX = "https://storage.googleapis.com/sfr-vision-language-research/"
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The official constants carried by med_config.json; Hugging Face BLIP configs store dropout 0 (inference only),
# so a model built from an HF directory keeps these for fine-tuning.
_OFFICIAL_TEXT_DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the source and what to do."""


# ----------------------------------------------------------------------------------------------------
# Load report
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a checkpoint load did, key by key.

    `missing`, `unexpected` and `mismatched` hold only keys that are NOT expected; the `expected_*` mappings hold
    the harmless ones with the reason. `mismatched` entries are (key, checkpoint shape, model shape).
    """

    source: str
    num_model_tensors: int = 0
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    expected_missing: dict[str, str] = field(default_factory=dict)
    expected_unexpected: dict[str, str] = field(default_factory=dict)
    expected_mismatched: dict[str, str] = field(default_factory=dict)
    interpolated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Architecture values that came from the checkpoint (HF directories), e.g. {'image_size': 384, 'vit': ...}:
    # a caller that writes the resolved config should merge these so the config describes the model.
    config_updates: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """True when nothing unexpected happened (every difference is an expected one)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Multi-line human-readable account of the load."""
        lines = [f"checkpoint {self.source}: loaded {len(self.loaded)}/{self.num_model_tensors} model tensors"]
        lines += [f"  resized: {msg}" for msg in self.interpolated]
        for title, entries in (("expected, not in checkpoint", self.expected_missing),
                               ("expected, ignored", self.expected_unexpected),
                               ("expected, shape differs, kept the model's", self.expected_mismatched)):
            for reason, keys in _group_by_reason(entries).items():
                lines.append(f"  {title}: {_abbreviate(keys)}: {reason}")
        if self.missing:
            lines.append(f"  MISSING, left at initialisation ({len(self.missing)}): {_abbreviate(self.missing)}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED, ignored ({len(self.unexpected)}): {_abbreviate(self.unexpected)}")
        for key, ckpt_shape, model_shape in self.mismatched:
            lines.append(f"  SHAPE MISMATCH {key}: checkpoint {ckpt_shape} vs model {model_shape}")
        lines += [f"  note: {msg}" for msg in self.notes]
        return "\n".join(lines)


def _group_by_reason(entries: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for key, reason in entries.items():
        grouped.setdefault(reason, []).append(key)
    return grouped


def _abbreviate(keys: list[str], limit: int = 6) -> str:
    """Name up to `limit` items; in a long list, keys of one top-level module collapse to `module.* (N keys)`."""
    items = list(keys)
    if len(keys) > limit:
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(key.split(".")[0], []).append(key)
        items = [f"{head}.* ({len(group)} keys)" if len(group) > 1 else group[0] for head, group in groups.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ----------------------------------------------------------------------------------------------------


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches_target: int, num_extra: int = 1) -> torch.Tensor:
    """Resize a ViT position embedding (1, num_extra + g*g, D) to a square grid of `num_patches_target` patches.

    The `num_extra` leading rows (the CLS token) are kept as they are; the patch rows are resized as a g x g image
    with bicubic interpolation (align_corners False), as the official loader does for 224 -> 384 px. Returns the
    input itself when the grid already has the target size.
    """
    grid_tokens = pos_embed.shape[1] - num_extra
    src, dst = math.isqrt(max(grid_tokens, 0)), math.isqrt(num_patches_target)
    if src * src != grid_tokens or src == 0:
        raise ValueError(f"position embedding with {pos_embed.shape[1]} tokens ({num_extra} extra) is not a square "
                         f"patch grid")
    if dst * dst != num_patches_target:
        raise ValueError(f"target of {num_patches_target} patches is not a square grid")
    if src == dst:
        return pos_embed
    width = pos_embed.shape[-1]
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    # Rows are in raster order (row-major over the patch grid), so this reshape recovers the 2-D layout.
    grid = grid.reshape(1, src, src, width).permute(0, 3, 1, 2).float()  # bicubic needs float on CPU
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, width).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def _interpolate_checkpoint_pos_embeds(state: dict, model_state: dict, report: LoadReport) -> None:
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key not in state or key not in model_state:
            continue
        ckpt, target = state[key], model_state[key]
        if ckpt.dim() != 3 or ckpt.shape[-1] != target.shape[-1] or ckpt.shape == target.shape:
            continue  # a width difference is an architecture mismatch: left for the shape check to report
        encoder = key.split(".")[0]
        num_patches = target.shape[1] - 1
        try:
            state[key] = interpolate_pos_embed(ckpt, num_patches, num_extra=1)
        except ValueError as err:
            raise CheckpointError(f"{report.source}: cannot resize {key} {tuple(ckpt.shape)} to "
                                  f"{tuple(target.shape)}: {err}") from None
        src, dst = math.isqrt(ckpt.shape[1] - 1), math.isqrt(num_patches)
        report.interpolated.append(f"{encoder}.pos_embed {src}x{src} -> {dst}x{dst} patch grid "
                                   f"({ckpt.shape[1]} -> {target.shape[1]} tokens, bicubic, CLS row kept)")


# ----------------------------------------------------------------------------------------------------
# Hugging Face key mapping
# ----------------------------------------------------------------------------------------------------

# BlipForImageTextRetrieval (transformers) name -> official BLIP name, vision tower outside the blocks.
HF_VISION_TOP = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",  # (1, 1, D) in both
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",  # (1, 1 + N, D), CLS row first in both
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",  # the final LayerNorm
    "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
}
# Inside block N: vision_model.encoder.layers.N.<hf> <-> visual_encoder.blocks.N.<official> (+ .weight / .bias).
# qkv has the same (3 * D, D) layout (q, k, v stacked, heads contiguous) in both.
HF_VISION_BLOCK = {
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Same names on both sides: HF's BLIP text model keeps the official MED layout (embeddings.word_embeddings,
# encoder.layer.N.attention / crossattention / intermediate / output), without token types or pooler.
HF_IDENTITY_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
_HF_BLOCK_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OFFICIAL_BLOCK_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_OFFICIAL_VISION_TOP = {v: k for k, v in HF_VISION_TOP.items()}
_OFFICIAL_VISION_BLOCK = {v: k for k, v in HF_VISION_BLOCK.items()}


def hf_to_official_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BlipForImageTextRetrieval state dict to official BLIP keys.

    Keys with no official counterpart are kept under their HF name so that the loader reports them as
    unexpected. HF has no momentum encoders, queues or `temp`; the loader fills those (see LoadReport).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        new = HF_VISION_TOP.get(key)
        if new is None:
            match = _HF_BLOCK_RE.match(key)
            if match and match.group(2) in HF_VISION_BLOCK:
                new = f"visual_encoder.blocks.{match.group(1)}.{HF_VISION_BLOCK[match.group(2)]}.{match.group(3)}"
            else:
                new = key  # text_encoder.*, vision_proj, text_proj, itm_head are identical; others stay visible
        out[new] = value
    return out


def official_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official BLIP keys to transformers BlipForImageTextRetrieval keys.

    Keeps only what the HF model has: the main encoders, projections and ITM head. Dropped on purpose (HF has no
    slot for them): momentum copies (`*_m`), the queues and their pointer, `temp`, `text_decoder.*`, and the
    `position_ids` buffer (non-persistent in HF).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key in _OFFICIAL_VISION_TOP:
            out[_OFFICIAL_VISION_TOP[key]] = value
            continue
        match = _OFFICIAL_BLOCK_RE.match(key)
        if match and match.group(2) in _OFFICIAL_VISION_BLOCK:
            out[f"vision_model.encoder.layers.{match.group(1)}.{_OFFICIAL_VISION_BLOCK[match.group(2)]}."
                f"{match.group(3)}"] = value
        elif key.startswith(HF_IDENTITY_PREFIXES):
            out[key] = value
    return out


def _looks_like_hf(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("vision_model.") for k in state)


# ----------------------------------------------------------------------------------------------------
# Reading files and URLs
# ----------------------------------------------------------------------------------------------------


def is_url(source: str) -> bool:
    """True for http(s) URLs."""
    return urlparse(source).scheme in ("http", "https")


def default_cache_dir() -> str:
    """$BLIP_CACHE, else ~/.cache/blip_retrieval."""
    return os.environ.get("BLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blip_retrieval")


def _cache_path(url: str, cache_dir: str) -> str:
    # host/path mirrors the URL, so equal file names from different places never collide and a human can find
    # (or pre-place) a file; '.' and '..' components are dropped so a URL cannot escape the cache.
    parsed = urlparse(url)
    parts = [parsed.netloc.replace(":", "_")] + [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    if len(parts) == 1:
        parts.append("index")
    return os.path.join(cache_dir, *parts)


def _manual_download_hint(url: str) -> str:
    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    return (f"Download it by hand (e.g. `curl -L -o {name} {url}` or `wget {url}`) and pass the local path "
            f"instead of the URL.")


def _download(url: str, dest: str) -> None:
    from tqdm import tqdm

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    # Write to a unique temp file beside the target and rename at the end: an interrupted download never
    # leaves a truncated file where the cache would find it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=os.path.basename(dest) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(dest),
                      disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            if total is not None and done != total:
                raise OSError(f"connection closed after {done} of {total} bytes")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise CheckpointError(f"could not download {url}: {err}. {_manual_download_hint(url)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_cached(url: str, cache_dir: str | None = None) -> str:
    """Return a local copy of `url`, downloading it once into `cache_dir` (default: `default_cache_dir()`).

    Under torchrun, local rank 0 downloads while the other ranks wait at a barrier, then all read the same file.
    """
    dest = _cache_path(url, cache_dir or default_cache_dir())
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if is_dist_initialized() else 0
    error: CheckpointError | None = None
    if local_rank == 0 and not os.path.isfile(dest):
        log(f"downloading {url} -> {dest}")
        try:
            _download(url, dest)
        except CheckpointError as err:
            error = err  # raised after the barrier so the waiting ranks are released first
    barrier()
    if error is not None:
        raise error
    if not os.path.isfile(dest):
        raise CheckpointError(f"could not download {url} (local rank 0 failed; see its log). "
                              f"{_manual_download_hint(url)}")
    return dest


def _is_trusted(source: str) -> bool:
    return not is_url(source) or source.startswith(OFFICIAL_URL_PREFIX)


def _first_line_with(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else text


def read_checkpoint(source: str, cache_dir: str | None = None) -> object:
    """Load a checkpoint file or URL onto the CPU under the pickle trust rule (see the module docstring).

    Returns whatever the file holds (usually a dict with 'model'); raises CheckpointError naming the source.
    """
    if is_url(source):
        path = download_cached(source, cache_dir)
    else:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {source!r} (no such file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # any failure gets the same handling: refuse, or retry if trusted
        refused = _first_line_with(str(safe_err), "Unsupported global")
        if not _is_trusted(source):
            raise CheckpointError(
                f"{source}: torch.load(weights_only=True) refused it ({refused}). Full unpickling can run code, so "
                f"it is only done for local files and for URLs under {OFFICIAL_URL_PREFIX}. If you trust this "
                f"file: {_manual_download_hint(source)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(f"{source}: the checkpoint pickles an object of a module that is not installed "
                              f"({err}); install it or re-save the checkpoint's 'model' entry alone") from None
    except Exception as err:  # corrupt, truncated or not a torch file at all
        size = os.path.getsize(path)
        cached = f" (cached at {path})" if path != os.path.expanduser(source) else ""
        raise CheckpointError(f"{source}{cached} is not a readable PyTorch checkpoint ({size} bytes; torch.load: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}). Check that the "
                              f"file is complete and is a .pth saved by torch.save.") from None
    where = "official BLIP URL" if is_url(source) else "local file"
    log(f"{os.path.basename(path)}: holds pickled objects besides tensors ({refused}); loaded with "
        f"weights_only=False because it is a {where} (trusted by our rule)")
    return obj


def _extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        found = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(f"{source}: not a BLIP checkpoint: expected a dict with key 'model' holding a state "
                              f"dict, or a state dict of tensors; found keys [{found}]")
    raise CheckpointError(f"{source}: not a BLIP checkpoint: expected a dict, found {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------------
# Key classification and loading
# ----------------------------------------------------------------------------------------------------

_UNEXPECTED_REASONS = (
    (lambda k: k.startswith("text_decoder."), "captioning decoder of pre-trained checkpoints; retrieval does not "
                                              "use it"),
    (lambda k: k == "queue_ptr", "pre-training/LAVIS name of the queue pointer; ignored, so ptr_queue keeps its "
                                 "value (0 in a fresh model), as in the official loader"),
)


def _missing_reason(key: str, momentum_copied: bool) -> str | None:
    if key == "idx_queue":
        return "not in the checkpoint (pre-trained, Hugging Face): stays -100 (no queue positives until the " \
               "queue refills), as in the official loader"
    if key == "ptr_queue":
        return "not in the checkpoint (pre-trained and LAVIS ones call it queue_ptr): stays 0, as in the " \
               "official loader"
    if key in ("image_queue", "text_queue"):
        return "no queue in the checkpoint (Hugging Face): random unit columns as in a fresh model; refilled " \
               "in training, unused in evaluation"
    if key == "temp":
        return "no temperature in the checkpoint (Hugging Face BLIP has none): keeps the initial 0.07"
    if key.endswith("embeddings.position_ids"):
        return "constant buffer arange(max_position_embeddings), the same in every model: nothing is lost"
    if key.startswith(MOMENTUM_PREFIXES) and momentum_copied:
        return "momentum copy not in the checkpoint (LAVIS and Hugging Face omit it): copied from the main weights"
    return None


def _momentum_to_main(key: str) -> str:
    head, rest = key.split(".", 1)
    return f"{head[:-2]}.{rest}"


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _architecture_hint(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> str:
    """Say what architecture the checkpoint seems to be, and which config keys would match it."""
    hints = []
    patch = state.get("visual_encoder.patch_embed.proj.weight")
    if patch is None:
        if any(k.startswith("text_decoder.") for k in state) and not any(k.startswith("text_encoder.") for k in state):
            return "it looks like a BLIP captioning checkpoint (text_decoder only); retrieval needs a pre-trained " \
                   "or retrieval checkpoint"
        return f"it has no visual_encoder.* keys, so it is not a BLIP checkpoint (first keys: {list(state)[:3]})"
    width, patch_size = patch.shape[0], patch.shape[-1]
    depth = _count(state, r"^visual_encoder\.blocks\.(\d+)\.")
    model_width = model_state["visual_encoder.patch_embed.proj.weight"].shape[0]
    model_depth = _count(model_state, r"^visual_encoder\.blocks\.(\d+)\.")
    if (width, depth) != (model_width, model_depth) or patch_size != \
            model_state["visual_encoder.patch_embed.proj.weight"].shape[-1]:
        named = [n for n, s in VIT_SIZES.items() if (s["width"], s["depth"], s["patch_size"]) ==
                 (width, depth, patch_size)]
        if named:
            short = {"base": "ViT-B", "large": "ViT-L"}[named[0]]
            hints.append(f"the checkpoint looks like {short} ({width} wide, {depth} blocks); set vit: {named[0]}")
        else:
            hints.append(f"the checkpoint's ViT is {width} wide with {depth} blocks and patch {patch_size}; set "
                         f"vit: {{width: {width}, depth: {depth}, heads: <heads>, patch_size: {patch_size}}}")
    words = state.get("text_encoder.embeddings.word_embeddings.weight")
    model_words = model_state["text_encoder.embeddings.word_embeddings.weight"]
    if words is not None:
        text_depth = _count(state, r"^text_encoder\.encoder\.layer\.(\d+)\.")
        model_text_depth = _count(model_state, r"^text_encoder\.encoder\.layer\.(\d+)\.")
        if words.shape[1] != model_words.shape[1] or text_depth != model_text_depth:
            hints.append(f"its text encoder is {words.shape[1]} wide with {text_depth} layers (model: "
                         f"{model_words.shape[1]}, {model_text_depth}); set med_config accordingly")
        elif words.shape[0] != model_words.shape[0]:
            hints.append(f"its vocabulary has {words.shape[0]} tokens but the model {model_words.shape[0]}; BLIP uses "
                         f"30524 (bert-base-uncased + [DEC], [ENC]): check text_encoder and med_config vocab_size")
    proj = state.get("vision_proj.weight")
    if proj is not None and proj.shape[0] != model_state["vision_proj.weight"].shape[0]:
        hints.append(f"its ITC projection is {proj.shape[0]}-d; set embed_dim: {proj.shape[0]}")
    return "; ".join(hints) if hints else "check that the config describes the same architecture"


def load_state_dict_checked(model: BlipRetrieval, state: Mapping[str, torch.Tensor],
                            source: str = "state dict") -> LoadReport:
    """Load `state` (official, our, or HF key names) into `model`, classifying every key; see LoadReport.

    Raises CheckpointError on an unexplained shape mismatch or when less than half of the model's (non-momentum)
    parameters would be loaded.
    """
    report = LoadReport(source=source)
    state = dict(state)
    if _looks_like_hf(state):
        state = hf_to_official_state_dict(state)
        report.notes.append("Hugging Face key names converted to official ones")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
        report.notes.append("stripped the DDP 'module.' prefix")
    model_state = model.state_dict()
    report.num_model_tensors = len(model_state)
    _interpolate_checkpoint_pos_embeds(state, model_state, report)

    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[tuple[str, tuple, tuple]] = []
    for key, value in state.items():
        if key not in model_state:
            reason = next((r for test, r in _UNEXPECTED_REASONS if test(key)), None)
            if reason:
                report.expected_unexpected[key] = reason
            else:
                report.unexpected.append(key)
        elif value.shape != model_state[key].shape:
            mismatched.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            to_load[key] = value

    # A different queue_size is the one harmless shape difference: the model keeps its own fresh queues, and the
    # pointer and image ids are reset with them so the three stay consistent.
    queue_keys = ("image_queue", "text_queue", "idx_queue")
    for key, ckpt_shape, model_shape in list(mismatched):
        if key in queue_keys and ckpt_shape[0] == model_shape[0]:
            mismatched.remove((key, ckpt_shape, model_shape))
            report.expected_mismatched[key] = (f"queue length {ckpt_shape[1]} in the checkpoint vs queue_size "
                                               f"{model_shape[1]}: the model keeps its fresh queues")
    if report.expected_mismatched:
        for key in (*queue_keys, "ptr_queue"):
            if key in to_load:
                del to_load[key]
                report.expected_mismatched.setdefault(key, "reset together with the resized queues")

    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:5])
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise CheckpointError(f"{source}: {len(mismatched)} tensors have a different shape than in the model: "
                              f"{shown}{more}. Hint: {_architecture_hint(state, model_state)}.")

    main_params = {k: p.numel() for k, p in model.named_parameters() if not k.startswith(MOMENTUM_PREFIXES)}
    loaded_numel = sum(n for k, n in main_params.items() if k in to_load)
    if loaded_numel < 0.5 * sum(main_params.values()):
        raise CheckpointError(f"{source}: only {loaded_numel / max(sum(main_params.values()), 1):.0%} of the model's "
                              f"parameters are in the checkpoint. Hint: {_architecture_hint(state, model_state)}.")

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key was checked against model_state above

    # Momentum encoders absent from the checkpoint start as copies of the main encoders, as in a fresh model.
    param_names = {k for k, _ in model.named_parameters()}
    momentum_params = {k for k in param_names if k.startswith(MOMENTUM_PREFIXES)}
    missing_momentum = {k for k in momentum_params if k not in to_load}
    if missing_momentum == momentum_params and momentum_params:
        model.copy_params()
        report.notes.append("no momentum encoders in the checkpoint: copied from the main weights (copy_params)")
    elif missing_momentum:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for key in missing_momentum:
                params[key].copy_(params[_momentum_to_main(key)])
        report.notes.append(f"{len(missing_momentum)} momentum tensors missing: copied from their main weights")

    # Extra or fewer layers are not shape mismatches; say so explicitly instead of leaving only a key list.
    for name, pattern in (("ViT blocks", r"^visual_encoder\.blocks\.(\d+)\."),
                          ("text encoder layers", r"^text_encoder\.encoder\.layer\.(\d+)\.")):
        ckpt_depth, model_depth = _count(state, pattern), _count(model_state, pattern)
        if ckpt_depth and ckpt_depth != model_depth:
            report.notes.append(f"the checkpoint has {ckpt_depth} {name}, the model {model_depth}: only the first "
                                f"{min(ckpt_depth, model_depth)} were loaded")
    report.loaded = sorted(to_load)
    for key in model_state:
        if key in to_load or key in report.expected_mismatched:
            continue
        reason = _missing_reason(key, momentum_copied=key in missing_momentum)
        if reason:
            report.expected_missing[key] = reason
        else:
            report.missing.append(key)
    return report


def load_checkpoint(model: BlipRetrieval, source: str, cache_dir: str | None = None) -> LoadReport:
    """Load an official BLIP .pth, one of our checkpoints or a raw state dict (path or URL) into `model`.

    pos_embed is resized to the model's image size; the report (also logged) lists what was loaded, what is
    missing or ignored and why. Raises CheckpointError on anything that would silently break the model.
    """
    obj = read_checkpoint(source, cache_dir)
    report = load_state_dict_checked(model, _extract_state_dict(obj, source), source)
    log(report.summary())
    return report


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------------------


def _hf_missing_files(path: str) -> list[str]:
    missing = []
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        missing.append(HF_CONFIG)
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS):
        missing.append(" or ".join(HF_WEIGHTS[::2]))
    return missing


def is_hf_directory(path: str) -> bool:
    """True for a directory holding config.json and HF weights (model.safetensors or pytorch_model.bin)."""
    return os.path.isdir(path) and not _hf_missing_files(path)


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):  # sharded save: load every shard the index names
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = os.path.join(path, shard)
                state.update(torch.load(shard_path, map_location="cpu", weights_only=True) if single
                             else load_file(shard_path))
            return state
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def _vit_from_hf(vision) -> str | dict:
    spec = {"width": vision.hidden_size, "depth": vision.num_hidden_layers, "heads": vision.num_attention_heads,
            "patch_size": vision.patch_size}
    for name, size in VIT_SIZES.items():
        if all(size[k] == v for k, v in spec.items()) and vision.intermediate_size == 4 * vision.hidden_size:
            return name  # the official sizes, which also bring the official drop-path default
    if vision.intermediate_size != 4 * vision.hidden_size:
        spec["mlp_ratio"] = vision.intermediate_size / vision.hidden_size
    return spec


def load_hf_directory(path: str, config: dict | None = None) -> tuple[BlipRetrieval, LoadReport]:
    """Build a BlipRetrieval from a transformers BlipForImageTextRetrieval directory and load its weights.

    Architecture (widths, depths, heads, patch and image size, vocabulary, activation, LayerNorm eps: HF's
    vision eps is 1e-5 where the official model uses 1e-6, so the directory's value is used) and tokenizer come
    from the directory. From `config`, only non-architecture keys are used (queue_size, momentum,
    negative_all_rank, vit_grad_ckpt, vit_ckpt_layer, drop_path_rate, max_length). The architecture values are
    returned in `report.config_updates`. The momentum encoders are copies of the main ones; `temp` stays 0.07.
    """
    from transformers import BlipConfig

    from utils import DEFAULT_CONFIG

    config = {**DEFAULT_CONFIG, **(config or {})}
    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face directory not found: {path!r}")
    missing = _hf_missing_files(path)
    if missing:
        raise CheckpointError(f"{path} is not a Hugging Face BlipForImageTextRetrieval directory: missing "
                              f"{' and '.join(missing)}")
    try:
        hf_config = BlipConfig.from_pretrained(path)
    except Exception as err:  # a malformed config.json can fail in many ways
        raise CheckpointError(f"{path}/{HF_CONFIG} is not a BLIP config: {err}") from None
    archs = getattr(hf_config, "architectures", None) or []
    if archs and "BlipForImageTextRetrieval" not in archs:
        log(f"warning: {path} holds {archs}, not BlipForImageTextRetrieval; loading what matches")
    vision, text = hf_config.vision_config, hf_config.text_config
    if vision.hidden_act != "gelu":  # the text activation is checked by MedConfig when the model is built
        raise CheckpointError(f"{path}: vision hidden_act {vision.hidden_act!r} is not supported (the BLIP ViT "
                              f"uses exact gelu)")

    tokenizer = init_tokenizer(path)  # adds [DEC] / [ENC] only when the directory's tokenizer lacks them
    if len(tokenizer) > text.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens (with [DEC] and [ENC]) but the "
                              f"text model only {text.vocab_size} embeddings")
    med_config = MedConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                           num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                           intermediate_size=text.intermediate_size, hidden_act=text.hidden_act,
                           max_position_embeddings=text.max_position_embeddings, layer_norm_eps=text.layer_norm_eps,
                           pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
                           encoder_width=vision.hidden_size, **_OFFICIAL_TEXT_DROPOUT)
    vit = _vit_from_hf(vision)
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    embed_dim = hf_config.image_text_hidden_size
    model = BlipRetrieval(med_config, tokenizer, vit=vit, image_size=image_size,
                          vit_grad_ckpt=config.get("vit_grad_ckpt", False),
                          vit_ckpt_layer=config.get("vit_ckpt_layer", 0),
                          vit_drop_path_rate=config.get("drop_path_rate"), vit_layer_norm_eps=vision.layer_norm_eps,
                          embed_dim=embed_dim, queue_size=config["queue_size"],
                          momentum=config.get("momentum", 0.995),
                          negative_all_rank=config.get("negative_all_rank", False),
                          max_length=config.get("max_length", 35))
    report = load_state_dict_checked(model, hf_to_official_state_dict(_read_hf_weights(path)), path)
    med_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "max_position_embeddings", "layer_norm_eps")
    report.config_updates = {"vit": vit, "image_size": image_size, "embed_dim": embed_dim, "text_encoder": path,
                             "vit_layer_norm_eps": vision.layer_norm_eps,
                             "med_config": {k: getattr(med_config, k) for k in med_fields}}
    changed = {k: v for k, v in report.config_updates.items() if config.get(k) != v}
    if "image_size" in changed:
        report.notes.append(f"image_size {image_size} from the directory (config had {config.get('image_size')}); "
                            f"the data transforms must use {image_size}")
    report.notes.append(f"architecture and tokenizer from {path} ([ENC] id {tokenizer.enc_token_id}, vocab "
                        f"{text.vocab_size}, vision LayerNorm eps {vision.layer_norm_eps:g})")
    log(report.summary())
    return model, report


def _hf_config_dict(model: BlipRetrieval) -> dict:
    vit = model.visual_encoder
    med = model.med_config
    tok = model.tokenizer
    width = vit.embed_dim
    embed_dim = model.vision_proj.out_features
    first_block = vit.blocks[0]
    dec_id = tok.convert_tokens_to_ids("[DEC]")
    return {
        "architectures": ["BlipForImageTextRetrieval"],
        "model_type": "blip",
        "image_text_hidden_size": embed_dim,
        "projection_dim": embed_dim,
        "vision_config": {
            "model_type": "blip_vision_model",
            "hidden_size": width,
            "intermediate_size": first_block.mlp.fc1.out_features,
            "num_hidden_layers": len(vit.blocks),
            "num_attention_heads": first_block.attn.num_heads,
            "image_size": vit.image_size,
            "patch_size": vit.patch_embed.proj.kernel_size[0],
            "hidden_act": "gelu",
            "layer_norm_eps": vit.norm.eps,  # 1e-6 for official models; written so HF computes the same
            "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "blip_text_model",
            "vocab_size": med.vocab_size,
            "hidden_size": med.hidden_size,
            "encoder_hidden_size": width,
            "intermediate_size": med.intermediate_size,
            "num_hidden_layers": med.num_hidden_layers,
            "num_attention_heads": med.num_attention_heads,
            "max_position_embeddings": med.max_position_embeddings,
            "hidden_act": med.hidden_act,
            "layer_norm_eps": med.layer_norm_eps,
            "hidden_dropout_prob": med.hidden_dropout_prob,
            "attention_probs_dropout_prob": med.attention_probs_dropout_prob,
            "initializer_range": med.initializer_range,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": dec_id,
            "sep_token_id": tok.sep_token_id,
            "eos_token_id": tok.sep_token_id,
            "is_decoder": True,  # HF builds the cross-attention layers only when this is set
            "projection_dim": embed_dim,
        },
    }


def export_hf_directory(model: BlipRetrieval, out_dir: str) -> str:
    """Write `model` as a transformers BlipForImageTextRetrieval directory; returns out_dir.

    Files: config.json, model.safetensors, the tokenizer files and preprocessor_config.json (CLIP mean/std,
    square bicubic resize). Not exported, because HF has no slot for them: momentum encoders, queues, `temp`.
    Note that HF's ITM forward reads whatever first token it is given; BLIP retrieval puts [ENC] there.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = official_to_hf_state_dict(model.state_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
        json.dump(_hf_config_dict(model), f, indent=2)
    model.tokenizer.save_pretrained(out_dir)
    size = model.visual_encoder.image_size
    preprocessor = {"image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
                    "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,  # bicubic
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    log(f"exported Hugging Face BlipForImageTextRetrieval to {out_dir} ({len(state)} tensors; not exported: "
        f"momentum encoders, queues, temp={model.temp.item():.4f})")
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def load_model(config: dict, source: str | None = None,
               cache_dir: str | None = None) -> tuple[BlipRetrieval, LoadReport | None]:
    """Build the retrieval model for `config` and load `source` into it (the entry point of train and eval).

    `source`: an HF directory (architecture and tokenizer from it; see load_hf_directory), a .pth path or http(s)
    URL (model from `config`, then load_checkpoint), or None / '' for a randomly initialised model (report None).
    For an HF directory, `config` is updated in place with the directory's architecture keys (vit, image_size,
    med_config, text_encoder, ...) so that transforms and the saved config.yaml match the loaded model.
    """
    if not source:
        return build_model(config), None
    if is_url(source):
        model = build_model(config)
        return model, load_checkpoint(model, source, cache_dir)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        model, report = load_hf_directory(path, config)
        config.update(report.config_updates)
        return model, report
    if not os.path.isfile(path):
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            hint = (f"; if this is a Hugging Face hub id, download it first (e.g. `huggingface-cli download {source} "
                    f"--local-dir DIR`) and pass DIR")
        raise CheckpointError(f"checkpoint not found: {source!r} (no such file or directory){hint}")
    model = build_model(config)
    return model, load_checkpoint(model, path, cache_dir)

"""Checkpoint loading for BlipRetrieval: the key report, official `.pth` files and URLs, and `load_model`.

Sources understood by `load_model`:
- official BLIP `.pth` files (pre-trained or retrieval fine-tuned, base or large), local or http(s) URL;
- our own training checkpoints (`{'model': ..., 'optimizer': ..., 'config': ..., 'epoch': ...}`, same keys);
- a raw state dict (official key names, or Hugging Face names, which are converted);
- a Hugging Face `BlipForImageTextRetrieval` directory (config.json + model.safetensors / pytorch_model.bin +
  tokenizer files): the architecture and the tokenizer come from the directory (models/hf_blip.py).

Unlike the official loader, which deletes shape-mismatched keys and loads with strict=False, every load here
classifies each key as loaded / missing / unexpected / shape-mismatched, names the ones that are expected and
harmless (and why), and raises `CheckpointError` when a mismatch is not one of those or when most of the model
would stay at its random initialisation (usually a ViT-L checkpoint in a ViT-B model, or the wrong model).

Pickle trust rule: files are read with `torch.load(weights_only=True)`. Official BLIP checkpoints also pickle the
training config and optimizer state, which that mode may refuse; full unpickling (`weights_only=False`, which can
execute code) is then allowed only for local files (the user chose to put them there) and for URLs under
`OFFICIAL_URL_PREFIX` (Salesforce's storage), and one log line says so. Any other URL is refused with a message
explaining how to download the file by hand and pass the local path if it is trusted.

models/hf_blip.py builds on this module (its directory loader reports through `load_state_dict_checked`), so
this module imports it only inside the functions that need it, which keeps the import graph free of cycles.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from timm.layers import resample_abs_pos_embed

from models.blip_retrieval import BlipRetrieval, build_model
from models.vit import VIT_SIZES
from utils import UserError, barrier, download_file, is_dist_initialized, log

OFFICIAL_URL_PREFIX = "https://storage.googleapis.com/sfr-vision-language-research/"
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")


class CheckpointError(UserError, RuntimeError):
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
        for title, entries in (
            ("expected, not in checkpoint", self.expected_missing),
            ("expected, ignored", self.expected_unexpected),
            ("expected, shape differs, kept the model's", self.expected_mismatched),
        ):
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
    return (
        f"Download it by hand (e.g. `curl -L -o {name} {url}` or `wget {url}`) and pass the local path "
        f"instead of the URL."
    )


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
            download_file(url, dest)
        except (OSError, ValueError) as err:
            # Raised after the barrier, so the waiting ranks are released first.
            error = CheckpointError(f"could not download {url}: {err}. {_manual_download_hint(url)}")
    barrier()
    if error is not None:
        raise error
    if not os.path.isfile(dest):
        raise CheckpointError(
            f"could not download {url} (local rank 0 failed; see its log). {_manual_download_hint(url)}"
        )
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
                f"file: {_manual_download_hint(source)}"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(
            f"{source}: the checkpoint pickles an object of a module that is not installed "
            f"({err}); install it or re-save the checkpoint's 'model' entry alone"
        ) from None
    except Exception as err:  # corrupt, truncated or not a torch file at all
        size = os.path.getsize(path)
        cached = f" (cached at {path})" if path != os.path.expanduser(source) else ""
        raise CheckpointError(
            f"{source}{cached} is not a readable PyTorch checkpoint ({size} bytes; torch.load: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}). Check that the "
            f"file is complete and is a .pth saved by torch.save."
        ) from None
    where = "official BLIP URL" if is_url(source) else "local file"
    log(
        f"{os.path.basename(path)}: holds pickled objects besides tensors ({refused}); loaded with "
        f"weights_only=False because it is a {where} (trusted by our rule)"
    )
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
        raise CheckpointError(
            f"{source}: not a BLIP checkpoint: expected a dict with key 'model' holding a state "
            f"dict, or a state dict of tensors; found keys [{found}]"
        )
    raise CheckpointError(f"{source}: not a BLIP checkpoint: expected a dict, found {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------------
# Key classification and loading
# ----------------------------------------------------------------------------------------------------

_UNEXPECTED_REASONS = (
    (
        lambda k: k.startswith("text_decoder."),
        "captioning decoder of pre-trained checkpoints; retrieval does not use it",
    ),
    (
        lambda k: k == "queue_ptr",
        "pre-training/LAVIS name of the queue pointer; ignored, so ptr_queue keeps its "
        "value (0 in a fresh model), as in the official loader",
    ),
)


def _missing_reason(key: str, momentum_copied: bool) -> str | None:
    if key == "idx_queue":
        return (
            "not in the checkpoint (pre-trained, Hugging Face): stays -100 (no queue positives until the "
            "queue refills), as in the official loader"
        )
    if key == "ptr_queue":
        return (
            "not in the checkpoint (pre-trained and LAVIS ones call it queue_ptr): stays 0, as in the official loader"
        )
    if key in ("image_queue", "text_queue"):
        return (
            "no queue in the checkpoint (Hugging Face): random unit columns as in a fresh model; refilled "
            "in training, unused in evaluation"
        )
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
            return (
                "it looks like a BLIP captioning checkpoint (text_decoder only); retrieval needs a pre-trained "
                "or retrieval checkpoint"
            )
        return f"it has no visual_encoder.* keys, so it is not a BLIP checkpoint (first keys: {list(state)[:3]})"
    width, patch_size = patch.shape[0], patch.shape[-1]
    depth = _count(state, r"^visual_encoder\.blocks\.(\d+)\.")
    model_width = model_state["visual_encoder.patch_embed.proj.weight"].shape[0]
    model_depth = _count(model_state, r"^visual_encoder\.blocks\.(\d+)\.")
    if (width, depth) != (model_width, model_depth) or patch_size != model_state[
        "visual_encoder.patch_embed.proj.weight"
    ].shape[-1]:
        named = [
            n for n, s in VIT_SIZES.items() if (s["width"], s["depth"], s["patch_size"]) == (width, depth, patch_size)
        ]
        if named:
            short = {"base": "ViT-B", "large": "ViT-L"}[named[0]]
            hints.append(f"the checkpoint looks like {short} ({width} wide, {depth} blocks); set vit: {named[0]}")
        else:
            hints.append(
                f"the checkpoint's ViT is {width} wide with {depth} blocks and patch {patch_size}; set "
                f"vit: {{width: {width}, depth: {depth}, heads: <heads>, patch_size: {patch_size}}}"
            )
    words = state.get("text_encoder.embeddings.word_embeddings.weight")
    model_words = model_state["text_encoder.embeddings.word_embeddings.weight"]
    if words is not None:
        text_depth = _count(state, r"^text_encoder\.encoder\.layer\.(\d+)\.")
        model_text_depth = _count(model_state, r"^text_encoder\.encoder\.layer\.(\d+)\.")
        if words.shape[1] != model_words.shape[1] or text_depth != model_text_depth:
            hints.append(
                f"its text encoder is {words.shape[1]} wide with {text_depth} layers (model: "
                f"{model_words.shape[1]}, {model_text_depth}); set med_config accordingly"
            )
        elif words.shape[0] != model_words.shape[0]:
            hints.append(
                f"its vocabulary has {words.shape[0]} tokens but the model {model_words.shape[0]}; BLIP uses "
                f"30524 (bert-base-uncased + [DEC], [ENC]): check text_encoder and med_config vocab_size"
            )
    proj = state.get("vision_proj.weight")
    if proj is not None and proj.shape[0] != model_state["vision_proj.weight"].shape[0]:
        hints.append(f"its ITC projection is {proj.shape[0]}-d; set embed_dim: {proj.shape[0]}")
    return "; ".join(hints) if hints else "check that the config describes the same architecture"


def _normalise_keys(state: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """A copy of `state` under official key names (Hugging Face names converted, DDP prefix stripped)."""
    from models import hf_blip  # imported here: hf_blip imports this module

    state = dict(state)
    if hf_blip.is_hf_state_dict(state):
        state = hf_blip.hf_to_official_state_dict(state)
        report.notes.append("Hugging Face key names converted to official ones")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
        report.notes.append("stripped the DDP 'module.' prefix")
    return state


def _resize_pos_embeds(
    state: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Resize the checkpoint's ViT position embeddings, in `state`, to the model's patch grid.

    The CLS row is kept and the patch rows are resized as a g x g image, e.g. 14x14 -> 24x24 for 224 -> 384 px.
    """
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key not in state or key not in model_state:
            continue
        ckpt, target = state[key], model_state[key]
        if ckpt.dim() != 3 or ckpt.shape[-1] != target.shape[-1] or ckpt.shape == target.shape:
            continue  # a width difference is an architecture mismatch: left for the shape check to report
        encoder = key.split(".")[0]
        grid_tokens = ckpt.shape[1] - 1
        src, dst = math.isqrt(max(grid_tokens, 0)), math.isqrt(target.shape[1] - 1)
        if src == 0 or src * src != grid_tokens:
            raise CheckpointError(
                f"{report.source}: cannot resize {key} {tuple(ckpt.shape)} to "
                f"{tuple(target.shape)}: position embedding with {ckpt.shape[1]} tokens "
                f"(1 extra) is not a square patch grid"
            )
        # Bicubic without antialiasing (timm's align_corners default is False): what the official loader computes.
        state[key] = resample_abs_pos_embed(
            ckpt, new_size=[dst, dst], num_prefix_tokens=1, interpolation="bicubic", antialias=False
        )
        report.interpolated.append(
            f"{encoder}.pos_embed {src}x{src} -> {dst}x{dst} patch grid "
            f"({ckpt.shape[1]} -> {target.shape[1]} tokens, bicubic, CLS row kept)"
        )


def _classify_keys(
    state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], report: LoadReport
) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple, tuple]]]:
    """Split the checkpoint's keys into loadable, unexpected (recorded in `report`) and shape-mismatched.

    Returns (tensors to load, unexplained shape mismatches as (key, checkpoint shape, model shape)).
    """
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
    accept_queue_resize(to_load, mismatched, report)
    return to_load, mismatched


def accept_queue_resize(
    to_load: dict[str, torch.Tensor], mismatched: list[tuple[str, tuple, tuple]], report: LoadReport
) -> None:
    """Move a different queue length out of `mismatched`: the one harmless shape difference.

    The model keeps its own fresh queues, and the pointer and image ids are reset with them (dropped from
    `to_load`) so that the three stay consistent.
    """
    queue_keys = ("image_queue", "text_queue", "idx_queue")
    for key, ckpt_shape, model_shape in list(mismatched):
        if key in queue_keys and ckpt_shape[0] == model_shape[0]:
            mismatched.remove((key, ckpt_shape, model_shape))
            report.expected_mismatched[key] = (
                f"queue length {ckpt_shape[1]} in the checkpoint vs queue_size "
                f"{model_shape[1]}: the model keeps its fresh queues"
            )
    if report.expected_mismatched:
        for key in (*queue_keys, "ptr_queue"):
            if key in to_load:
                del to_load[key]
                report.expected_mismatched.setdefault(key, "reset together with the resized queues")


def _raise_if_unusable(
    model: BlipRetrieval,
    state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    to_load: Mapping[str, torch.Tensor],
    mismatched: list[tuple[str, tuple, tuple]],
    source: str,
) -> None:
    """Raise CheckpointError, with an architecture hint, on an unexplained shape mismatch or when less
    than half of the model's (non-momentum) parameters would be loaded."""
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:5])
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors have a different shape than in the model: "
            f"{shown}{more}. Hint: {_architecture_hint(state, model_state)}."
        )
    main_params = {k: p.numel() for k, p in model.named_parameters() if not k.startswith(MOMENTUM_PREFIXES)}
    loaded_numel = sum(n for k, n in main_params.items() if k in to_load)
    if loaded_numel < 0.5 * sum(main_params.values()):
        raise CheckpointError(
            f"{source}: only {loaded_numel / max(sum(main_params.values()), 1):.0%} of the model's "
            f"parameters are in the checkpoint. Hint: {_architecture_hint(state, model_state)}."
        )


def _fill_missing_momentum(model: BlipRetrieval, to_load: Mapping[str, torch.Tensor], report: LoadReport) -> set[str]:
    """Momentum parameters absent from the checkpoint start as copies of the main ones, as in a fresh
    model. Returns their names."""
    momentum_params = {k for k, _ in model.named_parameters() if k.startswith(MOMENTUM_PREFIXES)}
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
    return missing_momentum


def _note_depth_differences(
    state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Extra or fewer layers are not shape mismatches; say so explicitly instead of leaving a key list."""
    for name, pattern in (
        ("ViT blocks", r"^visual_encoder\.blocks\.(\d+)\."),
        ("text encoder layers", r"^text_encoder\.encoder\.layer\.(\d+)\."),
    ):
        ckpt_depth, model_depth = _count(state, pattern), _count(model_state, pattern)
        if ckpt_depth and ckpt_depth != model_depth:
            report.notes.append(
                f"the checkpoint has {ckpt_depth} {name}, the model {model_depth}: only the first "
                f"{min(ckpt_depth, model_depth)} were loaded"
            )


def _classify_missing(
    model_state: Mapping[str, torch.Tensor],
    to_load: Mapping[str, torch.Tensor],
    missing_momentum: set[str],
    report: LoadReport,
) -> None:
    """Record what was loaded, and each model tensor the checkpoint did not provide, as expected (with
    the reason) or missing."""
    report.loaded = sorted(to_load)
    for key in model_state:
        if key in to_load or key in report.expected_mismatched:
            continue
        reason = _missing_reason(key, momentum_copied=key in missing_momentum)
        if reason:
            report.expected_missing[key] = reason
        else:
            report.missing.append(key)


def load_state_dict_checked(
    model: BlipRetrieval, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> LoadReport:
    """Load `state` (official, our, or HF key names) into `model`, classifying every key; see LoadReport.

    Raises CheckpointError on an unexplained shape mismatch or when less than half of the model's (non-momentum)
    parameters would be loaded.
    """
    report = LoadReport(source=source)
    model_state = model.state_dict()
    report.num_model_tensors = len(model_state)
    state = _normalise_keys(state, report)
    _resize_pos_embeds(state, model_state, report)
    to_load, mismatched = _classify_keys(state, model_state, report)
    _raise_if_unusable(model, state, model_state, to_load, mismatched, source)
    # strict=False because missing keys are expected and reported; every key in `to_load` was
    # checked against the model's state dict above, so none can be unexpected.
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    missing_momentum = _fill_missing_momentum(model, to_load, report)
    _note_depth_differences(state, model_state, report)
    _classify_missing(model_state, to_load, missing_momentum, report)
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
# Entry point
# ----------------------------------------------------------------------------------------------------


def load_model(
    config: dict, source: str | None = None, cache_dir: str | None = None
) -> tuple[BlipRetrieval, LoadReport | None]:
    """Build the retrieval model for `config` and load `source` into it (the entry point of train and eval).

    With `model: clip` the CLIP loader does it all (models/clip.py load_clip_model; None / '' = `pretrained`), and
    with `model: blip2` the BLIP-2 one (models/blip2.py load_blip2_model).
    `source`: an HF directory (architecture and tokenizer from it; see load_hf_directory), a .pth path or http(s)
    URL (model from `config`, then load_checkpoint), or None / '' for a randomly initialised model (report None).
    For an HF directory, `config` is updated in place with the directory's architecture keys (vit, image_size,
    med_config, text_encoder, ...) so that transforms and the saved config.yaml match the loaded model.
    """
    if config["model"] == "clip":  # a CLIP dual encoder: its own sources and loader (models/clip.py)
        from models.clip import load_clip_model

        return load_clip_model(config, source or None), None
    if config["model"] == "blip2":  # BLIP-2 first stage: HF directories, LAVIS and our .pth (models/blip2.py)
        from models.blip2 import load_blip2_model  # imported here: blip2 imports this module

        return load_blip2_model(config, source or None)
    if not source:
        return build_model(config), None
    if is_url(source):
        model = build_model(config)
        return model, load_checkpoint(model, source, cache_dir)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        from models.hf_blip import load_hf_directory  # imported here: hf_blip imports this module

        model, report = load_hf_directory(path, config)
        config.update(report.config_updates)
        return model, report
    if not os.path.isfile(path):
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            hint = (
                f"; if this is a Hugging Face hub id, download it first (e.g. `huggingface-cli download {source} "
                f"--local-dir DIR`) and pass DIR"
            )
        raise CheckpointError(f"checkpoint not found: {source!r} (no such file or directory){hint}")
    obj = read_checkpoint(path, cache_dir)
    from models.peft_methods import is_delta_checkpoint, load_delta_checkpoint  # imports this module

    if is_delta_checkpoint(obj):  # a parameter-efficient run's checkpoint: its base, then its trainable part
        return load_delta_checkpoint(config, obj, path)
    model = build_model(config)
    report = load_state_dict_checked(model, _extract_state_dict(obj, path), path)
    log(report.summary())
    return model, report

"""Parameter-efficient fine-tuning of BlipRetrieval: which weights train, and checkpoints that hold only those.

`finetune.method` (configs.schema.DEFAULT_CONFIG):
- full: every weight trains (the official recipe); checkpoints hold the whole state dict, as before.
- lora: low-rank adapters injected with the `peft` library (`inject_adapter_in_model`, LoraConfig) into the
  modules named by `finetune.lora.target_modules` (suffixes: ViT `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`;
  MED `attention.self.{query,key,value}`, `crossattention.self.{query,key,value}`, ...).
- prompt: learnable text tokens inserted after [CLS]/[ENC], and/or visual prompt tokens inserted after the ViT's
  class token (VPT-shallow, Jia et al. 2022) (written here; peft's prompt tuning assumes a transformers language
  model and does not fit BLIP's image-text forward).
- adapter: ContextBLIP's multi-scale adapter on the ViT, trained with ITM + TMIM (models/context_adapter.py).

The momentum encoders. The online and momentum towers get identical adapters; after injection the momentum
towers are reset to exact copies of the online ones (base weights and adapters), and from then on the momentum
update moves only the copies of trainable parameters (EMA, momentum `momentum`). So the momentum model is always
"frozen base + EMA of the adapters", its frozen weights stay bitwise equal to the online ones, and the pairing of
online and momentum parameters is by name and checked (BlipRetrieval.momentum_param_pairs). Note that this drops
the momentum weights a checkpoint may carry (fine-tuned BLIP checkpoints hold EMA weights that lag the online
ones); full fine-tuning keeps them, as the official code does.

Checkpoints of a parameter-efficient run ("delta" checkpoints) hold only what is not frozen base weight: the
trainable parameters, their momentum copies and the buffers (queues), plus `finetune`: the method's config and a
reference to the base (its source and the SHA-256 of its online weights, checked when the delta is applied).
models/loading.py loads one (`load_delta_checkpoint`: the recorded base, always read safely, then the delta).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from models.blip_retrieval import BlipRetrieval
from models.checkpoint import CheckpointError, LoadReport, accept_queue_resize
from models.context_adapter import attach_context_adapter
from utils import UserError, log

DELTA_FORMAT = "blip-retrieval-delta-v1"
MOMENTUM_SUFFIX = "_m"  # visual_encoder -> visual_encoder_m, ...


class TextPrompt(nn.Module):
    """`num_tokens` learnable vectors inserted after position 0 ([CLS] or [ENC]) of the embedded text.

    Position 0 stays first, so ITC ([CLS]) and ITM ([ENC]) read the same position as without prompts; the real
    tokens keep their position embeddings. Initialised from the embeddings of random vocabulary tokens (prompt
    tuning initialised from the vocabulary trains better than from noise, Lester et al. 2021).
    """

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.clone())

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        batch = hidden.shape[0]
        prompts = self.tokens.to(hidden.dtype)[None].expand(batch, -1, -1)
        hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, self.tokens.shape[0])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return hidden, attention_mask


class VisionPrompt(nn.Module):
    """Learnable vectors (`init`: (num_tokens, width)) inserted after the ViT's class token, after the position
    embeddings (they have no position), before the first block (VPT-shallow). Every block attends to them; `drop`
    removes their outputs after the last block, so the image tokens keep their shape (B, 1 + patches, width) for
    ITC, ITM's cross-attention and TMIM. `_add_prompts` draws `init` from a normal distribution with std 0.02
    (the scale of timm's position embeddings)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompts = self.tokens.to(x.dtype)[None].expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], x[:, 1 + self.tokens.shape[0] :]], dim=1)


# ----------------------------------------------------------------------------------------------------
# Applying a method
# ----------------------------------------------------------------------------------------------------


def base_fingerprint(model: BlipRetrieval) -> str:
    """SHA-256 of the online (non-momentum) parameters, in name order: identifies the base weights exactly."""
    digest = hashlib.sha256()
    pairs = {id(m) for _, m in model.model_pairs}
    momentum_names = {n for n, m in model.named_children() if id(m) in pairs}
    for name, p in model.named_parameters():
        if name.split(".")[0] in momentum_names:
            continue
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _momentum_name(name: str, model: BlipRetrieval) -> str | None:
    """The momentum copy of online parameter `name`, or None when it has none (heads, temp, TMIM decoder)."""
    head, _, rest = name.partition(".")
    for online, _ in model.model_pairs:
        if getattr(model, head, None) is online:
            return f"{head}{MOMENTUM_SUFFIX}.{rest}"
    return None


def _is_momentum(name: str, model: BlipRetrieval) -> bool:
    head = name.partition(".")[0]
    return any(getattr(model, head, None) is momentum for _, momentum in model.model_pairs)


def _inject_lora(model: BlipRetrieval, cfg: dict) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # lazy: only LoRA runs need peft

    lora = LoraConfig(
        r=cfg["rank"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=list(cfg["target_modules"]),
        bias="none",
    )
    try:
        inject_adapter_in_model(lora, model)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise UserError(
            f"config key 'finetune.lora.target_modules' {cfg['target_modules']}: {str(err).splitlines()[0]} "
            "(module names: ViT blocks.N.attn.qkv, attn.proj, mlp.fc1, mlp.fc2; text encoder "
            "attention.self.{query,key,value}, crossattention.self.{query,key,value}, attention.output.dense)"
        ) from None
    # Every target suffix must have matched something, in the online and momentum towers alike.
    names = [n for n, _ in model.named_modules()]
    for target in cfg["target_modules"]:
        if not any(n.endswith(f".{target}.lora_A") or n == f"{target}.lora_A" for n in names):
            raise UserError(
                f"config key 'finetune.lora.target_modules': {target!r} matches no module of the model "
                "(e.g. attn.qkv, mlp.fc1, attention.self.query, crossattention.self.value)"
            )


def _add_prompts(model: BlipRetrieval, cfg: dict) -> None:
    if cfg["vision_tokens"]:
        # A generator of its own, as for the text prompts: the global RNG (batches, negatives) is left as it was.
        generator = torch.Generator().manual_seed(0)
        init = 0.02 * torch.randn(cfg["vision_tokens"], model.visual_encoder.embed_dim, generator=generator)
        init = init.to(model.visual_encoder.cls_token.device)
        model.visual_encoder.prompt = VisionPrompt(init)
        model.visual_encoder_m.prompt = VisionPrompt(init)
    if not cfg["text_tokens"]:
        return
    encoder = model.text_encoder
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, encoder.config.vocab_size, (1, cfg["text_tokens"]), generator=generator)
        was_training = encoder.embeddings.training
        encoder.embeddings.eval()
        init = encoder.embeddings(ids.to(encoder.embeddings.word_embeddings.weight.device))[0]
        encoder.embeddings.train(was_training)
    model.text_encoder.prompt = TextPrompt(init)
    model.text_encoder_m.prompt = TextPrompt(init)


def _is_method_param(name: str, method: str) -> bool:
    if method == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if method == "prompt":
        return name.startswith(("text_encoder.prompt.", "visual_encoder.prompt."))
    if method == "adapter":
        return name.startswith(("visual_encoder.adapter.", "tmim."))
    return False


def apply_finetune(model: BlipRetrieval, config: dict, base_source: str | None) -> None:
    """Turn `model` (base weights already loaded) into `finetune.method`'s model, in place: add the method's
    parameters to the online and momentum towers, freeze everything else (extra_trainable aside), and reset the
    momentum towers to copies of the online ones. `full` leaves the model untouched. Records `model.finetune`
    (method config + base reference) for checkpoints."""
    ft = config["finetune"]
    method = ft["method"]
    existing = getattr(model, "finetune", None)
    if existing is not None:  # a delta checkpoint loaded through load_model already applied its method
        if existing["config"]["method"] != method:
            raise UserError(
                f"the loaded checkpoint was trained with finetune.method {existing['config']['method']!r}, the "
                f"config asks for {method!r}; set finetune.method to {existing['config']['method']!r}"
            )
        return
    if method == "full":
        return
    fingerprint = base_fingerprint(model)
    if method == "lora":
        _inject_lora(model, ft["lora"])
    elif method == "prompt":
        _add_prompts(model, ft["prompt"])
    elif method == "adapter":
        attach_context_adapter(model, ft["adapter"])
    extra = tuple(ft["extra_trainable"])
    names = [n for n, _ in model.named_parameters()]
    for prefix in extra:
        if not any(n.startswith(prefix) and not _is_momentum(n, model) for n in names):
            raise UserError(
                f"config key 'finetune.extra_trainable': {prefix!r} is the prefix of no parameter "
                "(e.g. itm_head, vision_proj, text_proj, temp)"
            )
    for name, p in model.named_parameters():
        p.requires_grad = not _is_momentum(name, model) and (_is_method_param(name, method) or name.startswith(extra))
    model.copy_params()  # momentum towers = online towers, adapters included, bitwise
    model.finetune = {
        "config": ft,
        "base": {"source": base_source or "", "sha256": fingerprint},
    }


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parameter_counts(model: BlipRetrieval) -> dict[str, int]:
    """Online parameters (momentum copies excluded), the trainable ones, and the method's own."""
    online = [(n, p) for n, p in model.named_parameters() if not _is_momentum(n, model)]
    method = getattr(model, "finetune", None)
    name = method["config"]["method"] if method else "full"
    return {
        "online": sum(p.numel() for _, p in online),
        "trainable": sum(p.numel() for _, p in online if p.requires_grad),
        "method": sum(p.numel() for n, p in online if _is_method_param(n, name)),
    }


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def delta_state_dict(model: BlipRetrieval) -> dict[str, torch.Tensor]:
    """The state dict without frozen base weights: trainable parameters, their momentum copies, buffers."""
    keep = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            keep.add(name)
            partner = _momentum_name(name, model)
            if partner is not None:
                keep.add(partner)
    params = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in keep or k not in params}


def model_payload(model: BlipRetrieval) -> dict:
    """What a checkpoint stores of the model: {'model': full state dict} for full fine-tuning, else the delta
    state dict plus {'finetune': method config and base reference, 'format_model': DELTA_FORMAT}."""
    meta = getattr(model, "finetune", None)
    if meta is None:
        return {"model": model.state_dict()}
    return {"model": delta_state_dict(model), "finetune": meta, "format_model": DELTA_FORMAT}


def is_delta_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format_model") == DELTA_FORMAT


def load_delta(model: BlipRetrieval, ckpt: dict, source: str) -> None:
    """Load a delta checkpoint into `model` (base loaded, method applied): the base must be the one the delta
    was trained on (SHA-256), and the delta must hold exactly the model's non-frozen tensors."""
    expected = model.finetune["base"]["sha256"]
    recorded = ckpt["finetune"]["base"]
    if recorded["sha256"] != expected:
        raise CheckpointError(
            f"{source}: its base weights were {recorded['source'] or 'a random initialisation'!r} "
            f"(sha256 {recorded['sha256'][:12]}), but the base loaded here ({model.finetune['base']['source']!r}) "
            f"has sha256 {expected[:12]}; point finetune.base (or pretrained) at the checkpoint it was trained from"
        )
    want = delta_state_dict(model)
    state = dict(ckpt["model"])
    missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    mismatched = [
        (k, tuple(state[k].shape), tuple(want[k].shape))
        for k in want.keys() & state.keys()
        if want[k].shape != state[k].shape
    ]
    # Another queue_size is harmless, as for full checkpoints: the model keeps its fresh queues (and pointer).
    report = LoadReport(source)
    accept_queue_resize(state, mismatched, report)
    if report.expected_mismatched:  # the first entry is a resized queue's own reason
        log(f"{source}: {next(iter(report.expected_mismatched.values()))}")
    mismatched = [key for key, _, _ in mismatched]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: the delta checkpoint does not match the model built from the config (method "
            f"{model.finetune['config']['method']}): missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape differs {mismatched[:4]}; are the finetune settings the ones it was trained with?"
        )
    model.load_state_dict(state, strict=False)


def resume_base(ckpt: dict, config: dict, resume_path: str) -> str | None:
    """The base a resumed run starts from: for a delta checkpoint finetune.base or its recorded source, else
    None (a full checkpoint holds every weight). Refuses a checkpoint of another finetune.method."""
    trained = ckpt["finetune"]["config"]["method"] if is_delta_checkpoint(ckpt) else "full"
    if trained != config["finetune"]["method"]:
        raise UserError(
            f"--resume: {resume_path} was trained with finetune.method {trained!r} but the config says "
            f"{config['finetune']['method']!r}; resume with the same method"
        )
    if trained == "full":
        return None
    return config["finetune"]["base"] or ckpt["finetune"]["base"]["source"] or None


# ----------------------------------------------------------------------------------------------------
# LoRA merge (export)
# ----------------------------------------------------------------------------------------------------


def merge_lora(model: BlipRetrieval) -> BlipRetrieval:
    """Fold every LoRA update into its base weight (W + scale * B @ A) and remove the LoRA layers, in place:
    the result has the official key names and loads like any full checkpoint. Online and momentum towers alike."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    meta = getattr(model, "finetune", None)
    if meta is None or meta["config"]["method"] != "lora":
        method = meta["config"]["method"] if meta else "full"
        raise UserError(f"only LoRA can be merged into the base weights; this model's finetune.method is {method!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in targets:
        layer.merge(safe_merge=True)  # safe_merge: refuses NaN/inf results
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad = False
    model.finetune = None
    return model

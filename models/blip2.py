"""BLIP-2's first stage as a retrieval model beside BLIP and CLIP: image encoder, Q-Former with its learned queries,
the ITC projections and the ITM head, all held by transformers' `Blip2ForImageTextRetrieval` (no Q-Former of ours).

What the evaluator uses (LAVIS `compute_sim_matrix` and `Blip2Qformer.compute_itm`, the BLIP-2 paper's retrieval):
- image: the ViT's tokens after its final LayerNorm (LAVIS `ln_vision`, HF `post_layernorm`) are what the queries
  cross-attend to; the 32 query outputs, projected and normalised, are the image's ITC vectors (B, 32, D);
- text: the Q-Former over the text alone (no queries), the projected and normalised [CLS] output (B, D);
- ITC similarity of an image and a text: the maximum over the 32 queries of their cosines;
- ITM: the Q-Former over [queries; text] with the queries cross-attending to the image, `itm_head` on every query
  output, the mean over the query positions of the logits (B, 2); LAVIS's re-ranked score is mean match logit +
  ITC similarity, which is `engine.itm_rerank.rerank_score`'s `official` score on these logits.

Sources (`load_blip2_model`):
- a Hugging Face `Blip2ForImageTextRetrieval` directory (config.json, model.safetensors or pytorch_model.bin,
  tokenizer files if any): architecture from the directory;
- a LAVIS first-stage checkpoint (`blip2_pretrain`: blip2_pretrained.pth, `blip2_coco`: blip2_finetune_coco.pth;
  ViT `eva_clip_g`), as a local file or URL, its keys converted by `lavis_to_ours` (every rule commented there);
- one of our checkpoints (keys `net.*` and `temp`);
- nothing: random initialisation.
The architecture of the last three comes from `blip2_config` (default: ViT-g/14 and a BERT-base Q-Former, LAVIS's
`eva_clip_g` at `image_size`). Every load reports each key as BLIP's loader does (models/checkpoint.py LoadReport).

`blip2_freeze_vit` freezes the image encoder (requires_grad False, kept in eval mode), as BLIP-2 pre-training does;
false trains it, as BLIP-2's COCO retrieval fine-tuning does.

Training (`Blip2Retrieval.forward`, train_retrieval.py with `model: blip2`) follows LAVIS's retrieval fine-tuning
(lavis/projects/blip2/train/retrieval_coco_ft.yaml, which runs Blip2Qformer.forward of
lavis/models/blip2_models/blip2_qformer.py with COCO image ids): ITC over the query-max similarities with image-id
targets and label smoothing 0.1, ITM with hard negatives from every rank; no momentum encoder, no queue. LAVIS's
forward also adds the Q-Former's image-grounded LM loss; it is not computed here (transformers'
Blip2ForImageTextRetrieval has no LM head: LAVIS's `Qformer.cls.*` weights are reported as unused on load).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.blip_retrieval import sample_hard_negatives
from models.checkpoint import CheckpointError, LoadReport, _abbreviate, is_url, read_checkpoint
from models.hf_blip import _read_hf_weights, is_hf_directory
from utils import ConfigError, all_gather_concat, all_gather_with_grad, log

LAVIS_TEMP_INIT = 0.07  # LAVIS Blip2Qformer: temp = 0.07 at initialisation (HF directories hold no temperature)
LAVIS_ITC_LABEL_SMOOTHING = 0.1  # Blip2Qformer.forward with image ids: 0.9 x id targets + 0.1 x uniform
SIM_CHUNK_VALUES = 2**26  # query-max similarity: at most this many (image, query, text) products at once


def require_blip2():
    """transformers' Blip2ForImageTextRetrieval, or a ConfigError saying that the installed transformers lacks it."""
    import transformers

    if not hasattr(transformers, "Blip2ForImageTextRetrieval"):
        raise ConfigError(
            f"model: blip2 needs transformers' Blip2ForImageTextRetrieval (transformers 4.47 or later); the installed "
            f"transformers {transformers.__version__} does not have it. Upgrade transformers to use BLIP-2"
        )
    return transformers


class Blip2Retrieval(nn.Module):
    """BLIP-2 first stage (`net`, an HF Blip2ForImageTextRetrieval) with its tokenizer and ITC temperature."""

    has_itm = True

    def __init__(self, net: nn.Module, tokenizer, max_length: int, freeze_vit: bool, identity: dict):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer  # not a module: not in the state dict
        self.max_length = max_length
        # LAVIS keeps a learnable temperature; HF's class has none, so it lives here (loaded from LAVIS checkpoints).
        self.temp = nn.Parameter(torch.tensor(LAVIS_TEMP_INIT))
        self.freeze_vit = freeze_vit
        if freeze_vit:
            self.net.vision_model.requires_grad_(False)
        self.identity = {**identity, "image_size": self.image_size, "context_length": max_length}

    def train(self, mode: bool = True) -> Blip2Retrieval:
        super().train(mode)
        if self.freeze_vit:  # a frozen ViT stays in eval mode, as LAVIS's disabled_train does
            self.net.vision_model.eval()
        return self

    @property
    def num_query_tokens(self) -> int:
        return self.net.query_tokens.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.net.text_projection.out_features

    @property
    def image_size(self) -> int:
        return self.net.config.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.net.config.vision_config.patch_size) ** 2 + 1

    @property
    def vision_width(self) -> int:
        return self.net.config.vision_config.hidden_size

    @torch.compiler.disable
    def tokenize(
        self, captions: list[str], device: torch.device | None = None, pad_to_longest: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ([CLS] first, as LAVIS: BLIP-2 has no [ENC]) and mask, truncated to max_length (35) and padded
        to it as LAVIS, or with `pad_to_longest` to the longest caption (the same outputs: padding is masked)."""
        tokens = self.tokenizer(
            captions,
            padding="longest" if pad_to_longest else "max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = device or self.temp.device
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def _queries(self, batch: int) -> torch.Tensor:
        return self.net.query_tokens.expand(batch, -1, -1)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens after its final LayerNorm (B, 1 + N, W): what the queries cross-attend to."""
        return self.net.vision_model(pixel_values=images).last_hidden_state

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit ITC vectors of the queries (B, Q, D), float32: the Q-Former over the queries alone."""
        ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.net.qformer(
            query_embeds=self._queries(len(image_embeds)),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=ones,
        ).last_hidden_state
        return F.normalize(self.net.vision_projection(hidden).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image tokens (B, 1 + N, W) for ITM, unit query vectors (B, Q, D) for ITC)."""
        image_embeds = self.image_tokens(images)
        return image_embeds, self.query_features(image_embeds)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit ITC text vectors (B, D), float32: the [CLS] output of the Q-Former over the text alone."""
        hidden = self.net.qformer(
            query_embeds=self.net.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(self.net.text_projection(hidden[:, 0]).float(), dim=-1)

    def itm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (B, 2) (index 1 = match), the mean over the query positions, of text b against image b."""
        batch, num_queries = len(input_ids), self.num_query_tokens
        queries = self._queries(batch)
        embeds = self.net.embeddings(input_ids=input_ids, query_embeds=queries)
        query_mask = torch.ones(batch, num_queries, dtype=attention_mask.dtype, device=attention_mask.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.net.qformer(
            query_embeds=embeds,
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.net.itm_head(hidden[:, :num_queries]).float().mean(dim=1)

    # ----------------------------------------------------------------------------------------------
    # Training: LAVIS Blip2Qformer.forward with image ids (its COCO retrieval fine-tuning), without the LM loss
    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        caption: list[str],
        alpha: float,
        idx: torch.Tensor,
        hard_negative_fraction: float = 1.0,
        text_compute: str = "static",
        update_queues: bool = True,
    ) -> dict:
        """Training losses and ITM statistics, with BlipRetrieval.forward's call and keys: {'loss' (loss_ita +
        loss_itm), 'loss_ita', 'loss_itm', 'loss_tmim' (always 0), 'itm_acc_pos', 'itm_acc_neg', 'num_neg_fallback'}.

        ITC (LAVIS, image ids given): the query-max similarities / temp of this rank's images against every rank's
        texts and of this rank's texts against every rank's images; the other ranks' features are gathered without
        gradient (LAVIS concat_all_gather, which also detaches in one process); targets spread evenly over the
        columns sharing the row's image id, smoothed 0.9 x that + 0.1 x uniform. The temperature is learned and not
        clamped (LAVIS). ITM: per text one negative image and per image one negative text, drawn from
        softmax(ITC similarity / temp) over every rank's batch with same-image columns excluded
        (`sample_hard_negatives`; `hard_negative_fraction` as for BLIP), scored by the ITM head on [queries; text].
        `alpha` and `update_queues` are accepted for the trainer's call and unused (BLIP-2 has no momentum encoder
        and no queue); captions are always padded to max_length (LAVIS; one shape on every rank for the gathers),
        whatever `text_compute` says.
        """
        del alpha, update_queues
        if text_compute not in ("trimmed", "static", "official"):
            raise ValueError(f"text_compute must be trimmed, static or official, got {text_compute!r}")
        idx = idx.view(-1, 1)
        bs = len(image)
        image_embeds, image_feat = self.encode_image(image)  # (B, 1 + N, W), (B, Q, D)
        text_ids, text_atts = self.tokenize(caption, image.device)
        text_feat = self.encode_text(text_ids, text_atts)  # (B, D)

        image_feat_world = all_gather_concat(image_feat.detach())
        text_feat_world = all_gather_concat(text_feat.detach())
        idx_world = all_gather_concat(idx)
        positive = torch.eq(idx, idx_world.t())  # (B, world batch): same image id
        sim_i2t = torch.einsum("bqd,nd->bnq", image_feat, text_feat_world).amax(dim=-1) / self.temp
        sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feat_world).amax(dim=-1) / self.temp
        targets = itc_targets(positive)
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2

        with torch.no_grad():
            neg_image_idx, fallback_t2i = sample_hard_negatives(sim_t2i, positive, hard_negative_fraction)
            neg_text_idx, fallback_i2t = sample_hard_negatives(sim_i2t, positive, hard_negative_fraction)
        image_embeds_world = all_gather_with_grad(image_embeds)  # a negative's gradient reaches its own rank
        ids_world, atts_world = all_gather_concat(text_ids), all_gather_concat(text_atts)
        # One ITM pass over (text b, image b), (text b, negative image), (negative text, image b), as LAVIS.
        all_ids = torch.cat([text_ids, text_ids, ids_world[neg_text_idx]], dim=0)
        all_atts = torch.cat([text_atts, text_atts, atts_world[neg_text_idx]], dim=0)
        all_images = torch.cat([image_embeds, image_embeds_world[neg_image_idx], image_embeds], dim=0)
        itm_logits = self.itm_logits(all_ids, all_atts, all_images)
        itm_labels = torch.zeros(3 * bs, dtype=torch.long, device=image.device)
        itm_labels[:bs] = 1
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        with torch.no_grad():
            called_match = itm_logits.argmax(dim=1) == 1
            itm_acc_pos = called_match[:bs].float().mean()
            itm_acc_neg = 1.0 - called_match[bs:].float().mean()
        return {
            "loss": loss_ita + loss_itm,
            "loss_ita": loss_ita,
            "loss_itm": loss_itm,
            "loss_tmim": torch.zeros((), device=image.device),
            "itm_acc_pos": itm_acc_pos,
            "itm_acc_neg": itm_acc_neg,
            "num_neg_fallback": fallback_t2i + fallback_i2t,
        }

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as LAVIS Blip2Base.get_optimizer_params: no weight decay for 1-D tensors and biases, decay
        for everything else (the 0-d temperature and the query tokens included). Frozen parameters are left out.
        LAVIS also gives the ViT layers `lr_scale`s (lr_layer_decay), but its schedulers overwrite every group's lr,
        so they have no effect there and none here."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def similarity(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """ITC similarity matrix (n_images, n_captions): the maximum over the queries of the cosines."""
        _, query_feat = self.encode_image(images)
        return query_max_similarity(query_feat, self.encode_text(*self.tokenize(captions, images.device)))


def itc_targets(positive: torch.Tensor, smoothing: float = LAVIS_ITC_LABEL_SMOOTHING) -> torch.Tensor:
    """LAVIS's ITC targets with image ids: each row spread evenly over its positive columns, then
    (1 - smoothing) x that + smoothing x uniform over all columns."""
    spread = positive.float() / positive.float().sum(dim=1, keepdim=True)
    return (1.0 - smoothing) * spread + smoothing / positive.shape[1]


def query_max_similarity(query_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """(N_img, N_txt): for each image and text, the maximum over the image's queries (N_img, Q, D) of the cosine with
    the text (N_txt, D). Images go in chunks so that the (chunk, Q, N_txt) products stay within SIM_CHUNK_VALUES."""
    n_img, num_queries, _ = query_feat.shape
    out = torch.empty(n_img, len(text_feat), device=query_feat.device, dtype=torch.float32)
    step = max(1, SIM_CHUNK_VALUES // max(1, num_queries * len(text_feat)))
    for start in range(0, n_img, step):
        block = query_feat[start : start + step].float() @ text_feat.float().t()  # (chunk, Q, N_txt)
        out[start : start + step] = block.amax(dim=1)
    return out


# ----------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------


def blip2_hf_config(config: dict, vocab_size: int):
    """The Blip2Config of `blip2_config`: '' = LAVIS's eva_clip_g first stage (ViT-g/14, 39 blocks, width
    1408; BERT-base Q-Former with cross-attention every 2 layers, 32 queries, ITC dim 256) at `image_size`; a path to a
    config.json
    (an HF Blip2 config) or a mapping of Blip2Config fields. The input resolution is always `image_size` (a
    checkpoint's position embedding is resized to it on load); the Q-Former always gets its text path
    (use_qformer_text_input) and, unless given, the tokenizer's vocabulary."""
    transformers = require_blip2()
    spec = config["blip2_config"]
    if isinstance(spec, str) and spec:
        if not os.path.isfile(spec):
            raise ConfigError(f"config key blip2_config: {spec!r} is not a file (expected an HF Blip2 config.json)")
        with open(spec) as f:
            spec = json.load(f)
    spec = dict(spec or {})
    vision = {**spec.pop("vision_config", {}), "image_size": config["image_size"]}  # the resolution is image_size's
    qformer = {"vocab_size": vocab_size, **spec.pop("qformer_config", {}), "use_qformer_text_input": True}
    qformer.setdefault("encoder_hidden_size", vision.get("hidden_size", transformers.Blip2VisionConfig().hidden_size))
    for key in ("architectures", "model_type", "text_config", "transformers_version", "torch_dtype", "dtype"):
        spec.pop(key, None)
    try:
        hf_config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, **spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key blip2_config: not a valid Blip2Config ({err})") from None
    size, patch = hf_config.vision_config.image_size, hf_config.vision_config.patch_size
    if size % patch:
        raise ConfigError(f"config key image_size: {size} is not divisible by the BLIP-2 ViT patch size {patch}")
    return hf_config


def _tokenizer(text_encoder: str):
    from models.blip_retrieval import init_tokenizer

    try:
        return init_tokenizer(text_encoder)
    except OSError as err:
        raise ConfigError(str(err)) from None


def build_blip2(config: dict, hf_config=None, tokenizer=None, identity: dict | None = None) -> Blip2Retrieval:
    """A randomly initialised Blip2Retrieval: `hf_config` (a Blip2Config) or the one `blip2_config` describes."""
    transformers = require_blip2()
    tokenizer = tokenizer or _tokenizer(config["text_encoder"])
    # LAVIS adds [DEC] (bos) to bert-base-uncased: 30523 tokens. init_tokenizer also adds [ENC], which BLIP-2 never
    # reads; plain text never tokenises to either.
    hf_config = hf_config or blip2_hf_config(config, vocab_size=tokenizer.vocab_size + 1)
    if hf_config.qformer_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the Q-Former has {hf_config.qformer_config.vocab_size} word embeddings but the tokenizer "
            f"({config['text_encoder']}) {tokenizer.vocab_size} tokens; they must match"
        )
    net = transformers.Blip2ForImageTextRetrieval(hf_config).float()
    net.config.image_token_index = None  # our ids never carry query placeholders
    if config["vit_grad_ckpt"]:  # LAVIS blip2_coco: use_grad_checkpoint, every ViT block
        enable = getattr(net.vision_model, "activation_checkpointing_enable", None)  # transformers 5's name
        (enable or net.vision_model.gradient_checkpointing_enable)(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    vision = hf_config.vision_config
    identity = identity or {
        "model": "blip2",
        "name": f"BLIP-2 ViT ({vision.hidden_size} wide, {vision.num_hidden_layers} blocks)",
        "activation": vision.hidden_act,
    }
    return Blip2Retrieval(net, tokenizer, config["max_length"], config["blip2_freeze_vit"], identity)


# ----------------------------------------------------------------------------------------------------
# LAVIS key layout
# ----------------------------------------------------------------------------------------------------

_LAVIS_RENAMES = (  # (LAVIS prefix, ours), first match wins
    ("visual_encoder.cls_token", "net.vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "net.vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "net.vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.", "net.vision_model.encoder.layers."),
    ("ln_vision.", "net.vision_model.post_layernorm."),  # LAVIS normalises the ViT output outside the ViT
    ("Qformer.bert.embeddings.LayerNorm.", "net.qformer.layernorm."),  # HF applies it inside the Q-Former
    ("Qformer.bert.embeddings.word_embeddings.", "net.embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "net.embeddings.position_embeddings."),
    ("Qformer.bert.encoder.", "net.qformer.encoder."),
    ("query_tokens", "net.query_tokens"),
    ("vision_proj.", "net.vision_projection."),
    ("text_proj.", "net.text_projection."),
    ("itm_head.", "net.itm_head."),
    ("temp", "temp"),
)
_LAVIS_BLOCK_RENAMES = (  # inside a ViT block (EVA layout -> HF Blip2EncoderLayer); q/v biases handled apart
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.weight", "self_attn.qkv.weight"),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.", "mlp."),
)
_LAVIS_IGNORED = (
    ("Qformer.cls.", "the Q-Former's language-modelling head (image-grounded generation); retrieval does not use it"),
    ("Qformer.bert.embeddings.position_ids", "constant buffer arange(max_position_embeddings): nothing is lost"),
)


def is_lavis_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """A LAVIS Blip2Qformer state dict: Q-Former under `Qformer.bert.` and the ViT under `visual_encoder.`."""
    return any(k.startswith("Qformer.bert.") for k in state)


def lavis_to_ours(state: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """LAVIS Blip2Qformer keys -> ours. The EVA ViT's separate q_bias and v_bias become HF's one qkv bias
    (q_bias, zeros for the keys, v_bias: EVA has no key bias); the Q-Former's `.self.` attention modules are HF's
    `.attention.`; ln_vision is HF's post_layernorm. Keys without a counterpart are left for the report."""
    if any(k.startswith("visual_encoder.transformer.") or k.startswith("visual_encoder.conv1") for k in state):
        raise CheckpointError(
            f"{report.source}: a LAVIS checkpoint with the clip_L ViT (blip2_pretrain_vitL); transformers' "
            "Blip2VisionModel holds only the eva_clip_g layout, so use blip2_pretrain or blip2_coco"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".attn.q_bias") or key.endswith(".attn.v_bias"):
            continue  # folded into the qkv bias below
        reason = next((r for prefix, r in _LAVIS_IGNORED if key.startswith(prefix)), None)
        if reason:
            report.expected_unexpected[key] = reason
            continue
        new = key
        for old, ours in _LAVIS_RENAMES:
            if key.startswith(old):
                new = ours + key[len(old) :]
                break
        layers = "net.vision_model.encoder.layers."
        if new.startswith(layers):
            index, rest = new[len(layers) :].split(".", 1)
            rest = next((ours + rest[len(old) :] for old, ours in _LAVIS_BLOCK_RENAMES if rest.startswith(old)), rest)
            new = f"{layers}{index}.{rest}"
        if new.startswith("net.qformer.encoder."):
            new = new.replace(".attention.self.", ".attention.attention.").replace(
                ".crossattention.self.", ".crossattention.attention."
            )
        out[new] = value
    for key in state:
        if key.endswith(".attn.q_bias"):
            block = key[: -len("attn.q_bias")]
            q_bias, v_bias = state[key], state[block + "attn.v_bias"]
            index = block.split(".")[2]
            out[f"net.vision_model.encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), v_bias]
            )
    report.notes.append("LAVIS Blip2Qformer key names converted (EVA q/v biases folded into one qkv bias)")
    return out


# ----------------------------------------------------------------------------------------------------
# Loading with a report
# ----------------------------------------------------------------------------------------------------

_OLD_HF_RENAMES = (  # early uploads of Salesforce/blip2-itm-vit-g*: the LAVIS names under HF's model
    ("qformer.embeddings.LayerNorm.", "qformer.layernorm."),
    ("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
)


def _hf_to_ours(state: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out = {}
    renamed = False
    for key, value in state.items():
        if key == "temp":
            out["temp"] = value
            continue
        if key.startswith("cls."):
            report.expected_unexpected[key] = "the Q-Former's language-modelling head; retrieval does not use it"
            continue
        for old, new in _OLD_HF_RENAMES:
            if key.startswith(old):
                key, renamed = new + key[len(old) :], True
                break
        out["net." + key] = value
    if renamed:
        report.notes.append("early Hugging Face BLIP-2 names (qformer.embeddings.*, *_proj) converted")
    return out


def _resize_position_embedding(state: dict, model_state: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """The checkpoint's ViT position embedding resized to the model's patch grid (blip2_pretrain is 224 px, the
    COCO model 364 px): class row kept, patch rows resized bicubically as a g x g image."""
    from timm.layers import resample_abs_pos_embed

    key = "net.vision_model.embeddings.position_embedding"
    if key not in state or key not in model_state or state[key].shape == model_state[key].shape:
        return
    ckpt, target = state[key], model_state[key]
    if ckpt.shape[-1] != target.shape[-1]:
        return  # a width difference is an architecture mismatch, reported by the shape check
    src, dst = math.isqrt(ckpt.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    if src * src != ckpt.shape[1] - 1:
        raise CheckpointError(f"{report.source}: {key} has {ckpt.shape[1]} positions, not a square grid plus one")
    state[key] = resample_abs_pos_embed(
        ckpt, new_size=[dst, dst], num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    report.interpolated.append(f"position embedding {src}x{src} -> {dst}x{dst} patch grid (bicubic, class row kept)")


def _missing_reason(key: str) -> str | None:
    if key == "temp":
        return f"no temperature in the checkpoint (Hugging Face BLIP-2 has none): keeps {LAVIS_TEMP_INIT}"
    if key.endswith("position_ids"):
        return "constant buffer arange(max_position_embeddings): nothing is lost"
    return None


def load_blip2_state(model: Blip2Retrieval, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Load a LAVIS, Hugging Face or our state dict into `model`, classifying every key (models/checkpoint.py
    LoadReport). Raises CheckpointError on a shape mismatch or when less than half the parameters would load."""
    report = LoadReport(source=source)
    model_state = model.state_dict()
    report.num_model_tensors = len(model_state)
    state = dict(state)
    given_keys = list(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
        report.notes.append("stripped the DDP 'module.' prefix")
    if is_lavis_state_dict(state):
        state = lavis_to_ours(state, report)
    elif not any(k.startswith("net.") for k in state):
        state = _hf_to_ours(state, report)
    _resize_position_embedding(state, model_state, report)
    to_load, mismatched = {}, []
    for key, value in state.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif value.shape != model_state[key].shape:
            mismatched.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            to_load[key] = value
    params = {k: p.numel() for k, p in model.named_parameters()}
    loaded = sum(n for k, n in params.items() if k in to_load)
    if loaded < 0.5 * sum(params.values()):
        raise CheckpointError(
            f"{source}: only {loaded / max(1, sum(params.values())):.0%} of the BLIP-2 model's parameters are in it "
            f"(its keys: {_abbreviate(given_keys)}); is it a BLIP-2 first-stage checkpoint?"
        )
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:5])
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors have a different shape than in the BLIP-2 model built from the "
            f"config: {shown}. Check blip2_config (or pass an HF directory, which carries its architecture)"
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = sorted(to_load)
    for key in model_state:
        if key not in to_load:
            reason = _missing_reason(key)
            if reason:
                report.expected_missing[key] = reason
            else:
                report.missing.append(key)
    return report


def is_hf_blip2_directory(path: str) -> bool:
    """A directory whose config.json describes a BLIP-2 model (model_type blip-2)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return False
    with open(file) as f:
        return json.load(f).get("model_type") == "blip-2"


def _load_hf_directory(path: str, config: dict) -> tuple[Blip2Retrieval, LoadReport]:

    transformers = require_blip2()
    if not is_hf_directory(path) or not is_hf_blip2_directory(path):
        raise CheckpointError(
            f"{path}: not a Hugging Face Blip2ForImageTextRetrieval directory (needs config.json with model_type "
            "blip-2 and model.safetensors or pytorch_model.bin)"
        )
    hf_config = transformers.Blip2Config.from_pretrained(path)
    hf_config.qformer_config.use_qformer_text_input = True
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json"))
    tokenizer = _tokenizer(path if has_tokenizer else config["text_encoder"])
    identity = {
        "model": "blip2",
        "name": f"BLIP-2 {os.path.basename(os.path.normpath(path))}",
        "activation": hf_config.vision_config.hidden_act,
    }
    model = build_blip2(config, hf_config, tokenizer, identity)
    report = load_blip2_state(model, _read_hf_weights(path), path)
    report.config_updates = {"image_size": model.image_size}
    return model, report


def load_blip2_model(
    config: dict, source: str | None = None, allow_unsafe: bool = False
) -> tuple[Blip2Retrieval, LoadReport | None]:
    """Build the BLIP-2 model for `config` and load `source` into it: an HF directory, a LAVIS or our .pth (path or
    URL), or None / '' for random weights. The report is logged; `config` is not changed (an HF directory's
    resolution is in `report.config_updates`). `allow_unsafe`: the user's `--unsafe-trust-checkpoint`."""
    if not source:
        model = build_blip2(config)
        log(f"{model.identity['name']}: randomly initialised (no pretrained weights)")
        return model, None
    path = os.path.expanduser(source)
    if not is_url(source) and os.path.isdir(path):
        model, report = _load_hf_directory(path, config)
    else:
        obj = read_checkpoint(source, allow_unsafe=allow_unsafe)
        state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{source}: expected a state dict (or a dict with 'model' holding one)")
        model = build_blip2(config)
        report = load_blip2_state(model, state, source)
    log(report.summary())
    return model, report

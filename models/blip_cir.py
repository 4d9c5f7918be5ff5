"""BLIP for composed image retrieval (CIRR): a reference image plus a modification text retrieve a target image.

The recipe of CoVR's BLIP model:
- query: the text encoder in multimodal mode over `[ENC]` + the modification text, cross-attending the reference
  image's ViT tokens; its position-0 output goes through `text_proj` and is L2-normalised;
- target: the ITC image feature, `vision_proj` of the ViT [CLS] token, L2-normalised;
- loss: HN-NCE (Radenovic et al. 2023), the loss the CoVR paper names, over the in-batch (all-rank) query x target
  similarities, at a fixed temperature 0.07, alpha 1, beta 0.5. `cir_hnnce_variant` picks the paper's formula
  (default) or the one CoVR's released code computes (`covr_code`, see `hn_nce_terms`);
- the ViT and `vision_proj` are frozen (the target features are those of the initial checkpoint); the text
  encoder and `text_proj` are trained.

The parts are the retrieval model's (`models.vit`, `models.med.BertModel`, the same projections) under the same
attribute names, so any BLIP retrieval or pre-trained checkpoint loads into it through models.checkpoint (the
ITM head, the momentum encoders, the queues and the learned temperature are reported as expected and unused).

`cir_query` picks what the query is built from: `multimodal` (above), `text` (the modification text alone, the
text-only ITC feature) or `image` (the reference image's ITC feature alone); the last two are baselines.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import CONFIG_CHOICES
from models.blip_retrieval import build_from_config
from models.checkpoint import (
    CheckpointError,
    LoadReport,
    _extract_state_dict,
    is_url,
    load_state_dict_checked,
    read_checkpoint,
)
from models.loading import load_model
from models.med import BertModel, MedConfig
from models.vit import create_vit
from utils import ConfigError, all_gather_with_grad, log

QUERY_MODES = ("multimodal", "text", "image")


HNNCE_VARIANTS = CONFIG_CHOICES["cir_hnnce_variant"]  # paper | covr_code


def hn_nce_terms(
    query: torch.Tensor,
    target: torch.Tensor,
    temp: float,
    alpha: float = 1.0,
    beta: float = 0.5,
    variant: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two directions of HN-NCE (Radenovic et al. 2023, "Filtering, distillation and hard negatives", eq. 3):
    (query->target, target->query), each averaged over the batch.

    With S = query @ target.T / temp (B x B, matching pairs on the diagonal), the query->target term of row i is
    log(alpha exp(S_ii) + sum_{j != i} w_ij exp(S_ij)) - S_ii, where the negatives are re-weighted by
    w_ij = (B - 1) exp(beta S_ij) / Z_i with Z_i = sum_{k != i} exp(beta S_ik): harder negatives (higher
    similarity) weigh more, and the weights of a row's negatives sum to B - 1 as in plain InfoNCE. The
    target->query term is the same over columns. Gradients flow through the weights too, as in CoVR's code.

    variant "paper" is the formula above. variant "covr_code" reproduces CoVR's released loss
    (src/model/blip/loss.py, HardNegativeNCE): its query->target weights divide row i by Z_j, the off-diagonal sum
    of row j (a (B,) row-sum vector broadcast along the last axis), so they no longer sum to B - 1 per row; its
    target->query term equals the paper's. The two variants agree whenever every row has the same Z.
    """
    if variant not in HNNCE_VARIANTS:
        raise ValueError(f"HN-NCE variant must be one of {HNNCE_VARIANTS}, got {variant!r}")
    sim = (query.float() @ target.float().t()) / temp
    n = sim.shape[0]
    if n < 2:
        raise ValueError("HN-NCE needs at least two pairs in a batch (one positive and at least one negative)")
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    positive = sim.diagonal()
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    terms = []
    for direction, s in (("q2t", sim), ("t2q", sim.t())):  # rows of s are the anchors of the direction
        beta_s = (beta * s).masked_fill(eye, float("-inf"))
        log_z = torch.logsumexp(beta_s, dim=1)  # log Z_i of each anchor row
        # The released code's quirk: row i divided by Z_j (j = column), only in the query->target direction.
        log_z = log_z[None, :] if variant == "covr_code" and direction == "q2t" else log_z[:, None]
        log_w = (math.log(n - 1.0) + beta_s - log_z).masked_fill(eye, log_alpha)  # log w_ij; log alpha on i = j
        terms.append((torch.logsumexp(s + log_w, dim=1) - positive).mean())
    return terms[0], terms[1]


def hn_nce_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    temp: float,
    alpha: float = 1.0,
    beta: float = 0.5,
    variant: str = "paper",
) -> torch.Tensor:
    """HN-NCE, the two directions of `hn_nce_terms` added (as CoVR does; alpha 1, beta 0 gives 2 x symmetric
    InfoNCE). variant: "paper" (Radenovic et al.'s formula) or "covr_code" (CoVR's released loss)."""
    q2t, t2q = hn_nce_terms(query, target, temp, alpha, beta, variant)
    return q2t + t2q


class BlipCir(nn.Module):
    def __init__(
        self,
        med_config: MedConfig,
        tokenizer,
        vit: str | dict = "large",
        image_size: int = 384,
        vit_grad_ckpt: bool = False,
        vit_ckpt_layer: int = 0,
        vit_drop_path_rate: float | None = None,
        vit_layer_norm_eps: float = 1e-6,
        embed_dim: int = 256,
        max_length: int = 35,
        temp: float = 0.07,
        train_vit: bool = False,
        query_mode: str = "multimodal",
        hnnce_variant: str = "paper",
    ):
        super().__init__()
        if query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
        if hnnce_variant not in HNNCE_VARIANTS:
            raise ValueError(f"hnnce_variant must be one of {HNNCE_VARIANTS}, got {hnnce_variant!r}")
        self.hnnce_variant = hnnce_variant  # paper | covr_code: see hn_nce_terms
        self.tokenizer = tokenizer  # not a module: not in the state dict
        self.enc_token_id = tokenizer.enc_token_id
        if len(tokenizer) > med_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but med_config vocab_size is {med_config.vocab_size}"
            )
        self.max_length = max_length
        self.temp = temp  # fixed, not learned (CoVR)
        self.query_mode = query_mode
        self.visual_encoder, vision_width = create_vit(
            vit, image_size, vit_grad_ckpt, vit_ckpt_layer, vit_drop_path_rate, vit_layer_norm_eps
        )
        med_config = MedConfig(**{**med_config.to_dict(), "encoder_width": vision_width})
        self.text_encoder = BertModel(med_config)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(med_config.hidden_size, embed_dim)
        self.train_vit = train_vit
        # The targets live in the checkpoint's ITC image space: vision_proj stays frozen (CoVR), the ViT too unless
        # train_vit.
        for p in self.vision_proj.parameters():
            p.requires_grad = False
        if not train_vit:
            for p in self.visual_encoder.parameters():
                p.requires_grad = False

    def tokenize(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, truncated to max_length and padded to the batch's longest (padding is masked)."""
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, 1+N, D); no gradient (and no stored activations) while the ViT is frozen."""
        with torch.set_grad_enabled(self.train_vit and torch.is_grad_enabled()):
            return self.visual_encoder(images)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit ITC image vectors (B, embed_dim) from ViT tokens: the gallery / target side."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def query_feat(self, image_embeds: torch.Tensor | None, texts: list[str]) -> torch.Tensor:
        """Unit query vectors (B, embed_dim) for reference-image tokens and modification texts, per `query_mode`."""
        if self.query_mode == "image":
            return self.image_feat(image_embeds)
        device = self.text_proj.weight.device
        ids, atts = self.tokenize(texts, device)
        if self.query_mode == "text":
            hidden = self.text_encoder(ids, atts, mode="text", cls_only=True)  # [CLS], the ITC text feature
        else:
            ids = ids.clone()
            ids[:, 0] = self.enc_token_id  # [ENC] replaces [CLS], as for ITM
            hidden = self.text_encoder(ids, atts, encoder_hidden_states=image_embeds, mode="multimodal", cls_only=True)
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def forward(
        self, ref_images: torch.Tensor, texts: list[str], target_feat: torch.Tensor, alpha: float, beta: float
    ) -> dict:
        """HN-NCE (`self.hnnce_variant`) over the batch, gathered from every rank (gradients flow back to each rank's
        own queries).

        target_feat: (B, embed_dim) unit ITC features of the targets (fixed: computed by the frozen image side).
        Returns {'loss', 'acc'}: acc is the share of queries whose own target is the most similar in the batch.
        """
        image_embeds = None if self.query_mode == "text" else self.image_tokens(ref_images)
        query = all_gather_with_grad(self.query_feat(image_embeds, texts))
        target = all_gather_with_grad(target_feat.float())
        loss = hn_nce_loss(query, target, self.temp, alpha, beta, self.hnnce_variant)
        with torch.no_grad():
            acc = ((query @ target.t()).argmax(dim=1) == torch.arange(len(query), device=query.device)).float().mean()
        return {"loss": loss, "acc": acc}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_cir_model(config: dict, tokenizer=None) -> BlipCir:
    """Build BlipCir from a resolved config (keys: configs.schema.DEFAULT_CONFIG). Bad values become ConfigError."""
    if config["vit_ckpt_layer"] == "auto":
        raise ConfigError("vit_ckpt_layer: auto is not supported by train_cirr.py; set a number of ViT blocks")
    return build_from_config(
        BlipCir,
        config,
        tokenizer,
        vit_grad_ckpt=config["vit_grad_ckpt"] and config["cir_train_vit"],
        embed_dim=config["embed_dim"],
        max_length=config["max_length"],
        temp=config["cir_temp"],
        train_vit=config["cir_train_vit"],
        query_mode=config["cir_query"],
        hnnce_variant=config["cir_hnnce_variant"],
    )


# Keys of BLIP retrieval / pre-trained checkpoints that composed retrieval does not use, and why.
_UNUSED_REASONS = (
    (("itm_head.",), "ITM head: composed retrieval ranks by ITC-space cosine only (CoVR)"),
    (
        ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m."),
        "momentum encoder of retrieval training: HN-NCE trains without one",
    ),
    (("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr"), "ITC queue of retrieval training"),
    (("temp",), "learned ITC temperature: HN-NCE uses the fixed cir_temp (CoVR: 0.07)"),
)


def _unused_reason(key: str) -> str | None:
    for prefixes, reason in _UNUSED_REASONS:
        if any(key == p or key.startswith(p) for p in prefixes):
            return reason
    return None


def load_cir_state_dict(model: BlipCir, state: dict, source: str) -> LoadReport:
    """Load a BLIP retrieval / pre-trained / composed-retrieval state dict into `model` with the loud report.

    The retrieval-only keys (ITM head, momentum encoders, queues, temperature) are set aside first and listed as
    expected and unused; everything else goes through models.checkpoint.load_state_dict_checked (HF key names,
    pos_embed resizing, shape checks, the 50% rule).
    """
    model_keys = set(model.state_dict())
    unused = {k: r for k in state if k not in model_keys and (r := _unused_reason(k))}
    kept = {k: v for k, v in state.items() if k not in unused}
    report = load_state_dict_checked(model, kept, source)
    report.expected_unexpected.update(unused)
    return report


def load_cir_model(
    config: dict, source: str | None = None, allow_unsafe: bool = False
) -> tuple[BlipCir, LoadReport | None]:
    """Build BlipCir for `config` and load `source`: an official BLIP .pth (path or URL; retrieval fine-tuned or
    pre-trained), a Hugging Face BlipForImageTextRetrieval directory, or one of our checkpoints (retrieval or
    composed retrieval). None / '' leaves the random initialisation (report None). The report is logged. `config`
    is not changed (an HF directory's architecture is in `report.config_updates`). `allow_unsafe`: the user's
    `--unsafe-trust-checkpoint`."""
    if not source:
        return build_cir_model(config), None
    path = os.path.expanduser(source)
    if not is_url(source) and os.path.isdir(path):
        # The directory fixes the architecture and tokenizer: load it as a retrieval model, then move its weights.
        retrieval, hf_report = load_model(config, path)
        model = build_cir_model({**config, **hf_report.config_updates}, tokenizer=retrieval.tokenizer)
        report = load_cir_state_dict(model, retrieval.state_dict(), source)
        report.config_updates = hf_report.config_updates
    else:
        model = build_cir_model(config)
        obj = read_checkpoint(source, allow_unsafe=allow_unsafe)
        report = load_cir_state_dict(model, _extract_state_dict(obj, source), source)
    log(report.summary())
    if report.missing or report.unexpected:
        log(f"WARNING: {source} did not provide every tensor of the model; see the report above")
    return model, report


def check_cir_checkpoint(report: LoadReport, source: str) -> None:
    """Refuse a resume whose checkpoint does not hold exactly this model (architecture or query mode changed)."""
    if report.missing or report.unexpected or report.expected_missing or report.expected_unexpected:
        raise CheckpointError(f"--resume: {source} does not match the model built from the config:\n{report.summary()}")

"""BLIP-2's first stage for composed image retrieval (CIRR), with the model API of models/blip_cir.py (image_tokens,
image_feat, query_feat, vision_proj / text_proj, trainable_parameters, query_mode) so engine/cir.py and
engine/cir_task.py serve it unchanged.

- query (`cir_query: multimodal`): the Q-Former over [32 queries; modification text] with the queries
  cross-attending the reference image's ViT tokens (BLIP-2's ITM path), its 32 query outputs pooled into one vector
  (`cir_blip2_pooling`: mean, the default, or max over the queries), then `text_proj` (the ITC text projection),
  L2-normalised. `text` is the ITC text feature of the modification text alone, `image` the reference's target-side
  feature (baselines, as for BLIP);
- target: the Q-Former over the 32 queries alone, cross-attending the target image (BLIP-2's ITC image path), its
  query outputs pooled the same way, then `vision_proj` (the ITC image projection), L2-normalised;
- loss: HN-NCE (models/blip_cir.py hn_nce_loss) at the fixed temperature `cir_temp`, as for BLIP.

Which weights train, and why. The query side shares the Q-Former with the target side, but the targets must stay
those the training contrasted against (and that evaluation ranks): as CoVR's BLIP-2 model, whose target features are
computed once with the starting weights, the target side is a frozen copy of the starting Q-Former and query tokens
(`target_qformer`, `target_query_tokens`), with `vision_proj` frozen. The Q-Former, its word embeddings, the query
tokens and `text_proj` train; the ViT trains only with `cir_train_vit` (then the target copy reads the trained ViT
and the targets are recomputed every epoch, engine/cir_task.py). The ITM head and the ITC temperature are unused.
The projections: `text_proj` for the query because the query output is what the text side of ITC would be matched
with, and CoVR's BLIP-2 model does the same; `vision_proj` for the target because it is the ITC image space the
zero-shot model already ranks in.

Pooling before the projection: for mean pooling this equals the mean of the projected queries (the projection is
affine); max pooling takes the maximum of each hidden unit over the queries.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import CONFIG_CHOICES
from models.blip2 import Blip2Retrieval, build_blip2, load_blip2_model
from models.blip_cir import HNNCE_VARIANTS, QUERY_MODES, hn_nce_loss
from models.checkpoint import CheckpointError, LoadReport, is_url, read_checkpoint
from utils import ConfigError, all_gather_with_grad, log

POOLINGS = CONFIG_CHOICES["cir_blip2_pooling"]  # mean | max
TARGET_PREFIXES = ("target_qformer.", "target_query_tokens")


def pool_queries(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, Q, H) query outputs -> (B, H): their mean, or the maximum of each unit over the queries."""
    if pooling == "mean":
        return hidden.mean(dim=1)
    if pooling == "max":
        return hidden.amax(dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class Blip2Cir(nn.Module):
    """The composed-retrieval model over a BLIP-2 first stage (`net`: an HF Blip2ForImageTextRetrieval)."""

    def __init__(
        self,
        retrieval: Blip2Retrieval,
        pooling: str = "mean",
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
        pool_queries(torch.zeros(1, 1, 1), pooling)  # refuses an unknown pooling here, not at the first batch
        self.net = retrieval.net
        self.tokenizer = retrieval.tokenizer  # not a module: not in the state dict
        self.max_length = retrieval.max_length
        self.identity = retrieval.identity
        self.pooling, self.temp, self.train_vit = pooling, temp, train_vit
        self.query_mode, self.hnnce_variant = query_mode, hnnce_variant
        # The target side: the starting Q-Former and queries, frozen (see the module docstring).
        self.target_qformer = copy.deepcopy(self.net.qformer).requires_grad_(False).eval()  # never dropout
        self.target_query_tokens = nn.Parameter(self.net.query_tokens.detach().clone(), requires_grad=False)
        self.net.requires_grad_(True)
        for frozen in (self.net.vision_projection, self.net.itm_head):
            frozen.requires_grad_(False)
        if not train_vit:
            self.net.vision_model.requires_grad_(False)

    def train(self, mode: bool = True) -> Blip2Cir:
        super().train(mode)
        self.target_qformer.eval()  # frozen: no dropout on the target side
        if not self.train_vit:
            self.net.vision_model.eval()
        return self

    @property
    def vision_proj(self) -> nn.Linear:
        return self.net.vision_projection

    @property
    def text_proj(self) -> nn.Linear:
        return self.net.text_projection

    @property
    def num_query_tokens(self) -> int:
        return self.net.query_tokens.shape[1]

    def tokenize(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ([CLS] first) and mask, truncated to max_length and padded to the batch's longest."""
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens after its final LayerNorm (B, 1 + N, W); no gradient while the ViT is frozen."""
        with torch.set_grad_enabled(self.train_vit and torch.is_grad_enabled()):
            return self.net.vision_model(pixel_values=images).last_hidden_state

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit target vectors (B, embed_dim): the frozen target Q-Former over the queries, pooled, vision_proj."""
        ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        with torch.no_grad():
            hidden = self.target_qformer(
                query_embeds=self.target_query_tokens.expand(len(image_embeds), -1, -1),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=ones,
            ).last_hidden_state
            return F.normalize(self.vision_proj(pool_queries(hidden, self.pooling)).float(), dim=-1)

    def query_feat(self, image_embeds: torch.Tensor | None, texts: list[str]) -> torch.Tensor:
        """Unit query vectors (B, embed_dim) for reference-image tokens and modification texts, per `query_mode`."""
        if self.query_mode == "image":
            return self.image_feat(image_embeds)
        ids, atts = self.tokenize(texts, self.text_proj.weight.device)
        if self.query_mode == "text":  # the ITC text feature: the Q-Former over the text alone, [CLS]
            hidden = self.net.qformer(
                query_embeds=self.net.embeddings(input_ids=ids), query_length=0, attention_mask=atts
            ).last_hidden_state
            return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)
        batch, num_queries = len(ids), self.num_query_tokens
        queries = self.net.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(batch, num_queries, dtype=atts.dtype, device=atts.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.net.qformer(
            query_embeds=self.net.embeddings(input_ids=ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, atts], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return F.normalize(self.text_proj(pool_queries(hidden[:, :num_queries], self.pooling)).float(), dim=-1)

    def forward(
        self, ref_images: torch.Tensor, texts: list[str], target_feat: torch.Tensor, alpha: float, beta: float
    ) -> dict:
        """HN-NCE over the batch gathered from every rank, as BlipCir.forward. Returns {'loss', 'acc'}."""
        image_embeds = None if self.query_mode == "text" else self.image_tokens(ref_images)
        query = all_gather_with_grad(self.query_feat(image_embeds, texts))
        target = all_gather_with_grad(target_feat.float())
        loss = hn_nce_loss(query, target, self.temp, alpha, beta, self.hnnce_variant)
        with torch.no_grad():
            acc = ((query @ target.t()).argmax(dim=1) == torch.arange(len(query), device=query.device)).float().mean()
        return {"loss": loss, "acc": acc}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def wrap_blip2_cir(retrieval: Blip2Retrieval, config: dict) -> Blip2Cir:
    """The composed-retrieval model over `retrieval` (its weights become the starting point), from the config keys."""
    try:
        return Blip2Cir(
            retrieval,
            pooling=config["cir_blip2_pooling"],
            temp=config["cir_temp"],
            train_vit=config["cir_train_vit"],
            query_mode=config["cir_query"],
            hnnce_variant=config["cir_hnnce_variant"],
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def is_blip2_cir_state(state) -> bool:
    """A state dict of Blip2Cir (it holds the frozen target side)."""
    return any(k.startswith(TARGET_PREFIXES) for k in state)


def load_blip2_cir_state(model: Blip2Cir, state, source: str) -> None:
    """Load one of our Blip2Cir state dicts; every key must match (a resume or an evaluated CIR run)."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the BLIP-2 composed-retrieval model built from the config: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load_blip2_cir_model(
    config: dict, source: str | None = None, allow_unsafe: bool = False
) -> tuple[Blip2Cir, LoadReport | None]:
    """Blip2Cir for `config` with `source` loaded: any BLIP-2 source load_blip2_model reads (HF directory, LAVIS or
    our retrieval .pth), whose Q-Former also becomes the frozen target side, or one of our Blip2Cir checkpoints
    (target side included). None / '' is random initialisation."""
    path = os.path.expanduser(source) if source else ""
    if path and not is_url(source) and os.path.isfile(path):
        obj = read_checkpoint(source, allow_unsafe=allow_unsafe)
        state = obj.get("model", obj) if isinstance(obj, dict) else obj
        if isinstance(state, dict) and is_blip2_cir_state(state):
            model = wrap_blip2_cir(build_blip2(config), config)
            load_blip2_cir_state(model, state, source)
            log(f"{source}: BLIP-2 composed-retrieval checkpoint loaded (every tensor)")
            return model, LoadReport(source=source, loaded=sorted(state))
    retrieval, report = load_blip2_model(config, source or None, allow_unsafe=allow_unsafe)
    return wrap_blip2_cir(retrieval, config), report  # the ITM head and the learned temp stay unused

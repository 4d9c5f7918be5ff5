"""ContextBLIP's multi-scale adapter and its text-guided masked image modelling loss (TMIM).

Built from the paper's description (Lin et al., "ContextBLIP: Doubly Contextual Alignment for Contrastive Image
Retrieval from Linguistically Complex Descriptions", Findings of ACL 2024); its public code does not run as shipped
(missing files and imports), so nothing here is checked against its numbers.

- Multi-scale adapter: one down-projection layer (DPAL: linear width -> width / delta, no bias, ReLU) on each chosen
  ViT block's output (default blocks 3, 6, 9, 12, 1-based; each normalised by the ViT's final LayerNorm), their
  outputs concatenated and mapped back by one shared up-projection (UPAL: linear, no bias, ReLU) outside the ViT,
  whose result is added to the ViT's output. Downsampling rate delta = 2 gives 4 x 768 x 384 + 1536 x 768 =
  2,359,296 parameters for ViT-B (the paper's "2.4M").
- Training: BLIP stays frozen; the adapter learns from the ITM loss (hard negatives as in BLIP) plus TMIM. TMIM
  masks the share pi (default 0.25) of patches that the text attends to most in the fusion encoder's
  cross-attention (positive pairs), encodes the visible patches with the adapted ViT, and a small Transformer
  decoder (self-attention over all positions, cross-attention to the text) reconstructs the masked patches'
  pixels; the loss is the MSE on the masked patches.

Choices where the paper is silent (see docs/peft.md):
- attention map: cross-attention probabilities averaged over heads, over every text-encoder layer, and over the
  non-padding text tokens, detached; ties broken by patch index (no noise);
- reconstruction targets: the normalised input pixels of each masked patch (no per-patch normalisation);
- decoder: MED layers (self- and cross-attention) of width `decoder_width` on [visible tokens + a learned mask
  token at masked positions] + learned position embeddings, cross-attending to the multimodal text states of
  the positive pair (detached), then a linear head to patch_size^2 x 3 pixels. It is training-only.

Options that follow ContextBLIP's released code (models/multiscale_adapter.py of github.com/LHL3341/ContextBLIP),
the defaults of configs/imagecode_contextblip.yaml:
- `tmim_text: contextblip`: the decoder reads the positive pair's text states h + TextAdapter(h), h not detached, so
  TMIM's gradient also reaches the vision adapter through the fusion encoder's cross-attention to the adapted image
  (the released code reads them from its positive ITM pass: the same computation);
- `itm_negatives: contextblip` (models/blip_retrieval.py): ITM negatives from the frozen pre-adapter features;
- `decoder_width: 768` (the released decoder is a 4-layer, 8-head BERT of width 768).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.med import BertLayer, MedConfig, padding_mask_to_bias
from utils import ConfigError


class MultiScaleAdapter(nn.Module):
    """DPALs on the chosen blocks + one shared UPAL; forward(final_tokens, block_outputs) -> adapted tokens."""

    def __init__(self, width: int, layers: list[int], reduction: int, gate: bool = False):
        super().__init__()
        if width % reduction:
            raise ConfigError(f"config key 'finetune.adapter.reduction': {reduction} does not divide width {width}")
        self.block_indices = [layer - 1 for layer in layers]  # 0-based, as the ViT enumerates its blocks
        hidden = width // reduction
        self.down = nn.ModuleList(nn.Linear(width, hidden, bias=False) for _ in layers)
        self.up = nn.Linear(hidden * len(layers), width, bias=False)
        # `finetune.adapter.gate`: a learned scalar on the UPAL output, initialised to 0, so that training starts
        # from the base model's exact outputs (as LoRA does). Without it the randomly initialised UPAL adds a
        # positive offset to every token from the first step. Not in ContextBLIP's description: an option.
        self.gate = nn.Parameter(torch.zeros(())) if gate else None

    def forward(self, x: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        latent = torch.cat([F.relu(down(t)) for down, t in zip(self.down, taps, strict=True)], dim=-1)
        update = F.relu(self.up(latent))
        return x + (update if self.gate is None else self.gate * update)


def select_masked_patches(attention: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, visible) patch indices (B, M) and (B, N - M), each sorted, for an attention map (B, N) over the
    N patches: the M = round(mask_ratio x N) highest-attention patches are masked (ties: lower index first)."""
    num = attention.shape[1]
    num_masked = min(max(int(round(mask_ratio * num)), 1), num - 1)
    order = torch.sort(attention, dim=1, descending=True, stable=True).indices
    masked = order[:, :num_masked].sort(dim=1).values
    visible = order[:, num_masked:].sort(dim=1).values
    return masked, visible


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch * patch * 3), patches in the ViT's row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class TextAdapter(nn.Module):
    """ContextBLIP's text adapter on TMIM's text side: h + ReLU(W2 ReLU(W1 h)), W1: width -> width / 4, no biases."""

    def __init__(self, width: int, reduction: int = 4):
        super().__init__()
        self.down = nn.Linear(width, width // reduction, bias=False)
        self.up = nn.Linear(width // reduction, width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.relu(self.up(F.relu(self.down(hidden))))


def text_cross_attention(
    model, enc_ids: torch.Tensor, text_atts: torch.Tensor, image_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fusion encoder on (text, image) pairs and return (attention (B, N_patches): the text's
    cross-attention to each patch, averaged over layers, heads and non-padding text tokens, detached; the last
    hidden states (B, L, text width), with gradient when grad mode is on). Attention probabilities are recomputed
    from each layer's query and key projections (the layers themselves use SDPA, which does not return them)."""
    captured: list[torch.Tensor] = []

    @torch.no_grad()
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states = kwargs["kv_states"]
        q = module.split_heads(module.query(hidden))
        k = module.split_heads(module.key(states))
        captured.append(torch.softmax((q @ k.transpose(-1, -2)).float() / module.head_dim**0.5, dim=-1).mean(1))

    handles = [
        layer.crossattention.self.register_forward_pre_hook(hook, with_kwargs=True)
        for layer in model.text_encoder.encoder.layer
    ]
    try:
        hidden = model.text_encoder(
            enc_ids, text_atts, encoder_hidden_states=image_embeds, mode="multimodal", cls_only=False
        )
    finally:
        for handle in handles:
            handle.remove()
    probs = torch.stack(captured).mean(0)  # (B, L_text incl. prompts, 1 + N)
    mask = text_atts.float()
    if probs.shape[1] != mask.shape[1]:  # prompt tokens (finetune.method prompt) count as text
        mask = torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], probs.shape[1] - mask.shape[1]), mask[:, 1:]], 1)
    attention = (probs * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    return attention[:, 1:], hidden  # drop the image [CLS] column


class TMIM(nn.Module):
    """Text-guided masked image modelling: forward(model, images, image_embeds, enc_ids, text_atts) -> MSE on the
    masked patches. `image_embeds` are the adapted ViT outputs of `images` (B rows); `enc_ids`/`text_atts` are the
    ITM batch (3B rows, positives first), of which the B positive pairs are used.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        num_patches: int,
        patch_size: int,
        mask_ratio: float,
        width: int,
        depth: int,
        heads: int,
        text_side: str = "detached",
    ):
        super().__init__()
        if width % heads:
            raise ConfigError(f"config key 'finetune.adapter.decoder_width': {width} is not divisible by {heads} heads")
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.embed = nn.Linear(vision_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        med = MedConfig(
            vocab_size=1,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            encoder_width=text_width,
        )
        self.layers = nn.ModuleList(BertLayer(med) for _ in range(depth))
        self.head = nn.Linear(width, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        # finetune.adapter.tmim_text: "detached" text states, or ContextBLIP's adapted ones with gradient. Built
        # last, so that the rest of TMIM draws the same initial weights either way.
        self.text_adapter = TextAdapter(text_width) if text_side == "contextblip" else None

    def forward(
        self,
        model,
        images: torch.Tensor,
        image_embeds: torch.Tensor,
        enc_ids: torch.Tensor,
        text_atts: torch.Tensor,
    ) -> torch.Tensor:
        bs = images.shape[0]
        enc_ids, text_atts = enc_ids[:bs], text_atts[:bs]
        if self.text_adapter is None:
            with torch.no_grad():
                attention, text_states = text_cross_attention(model, enc_ids, text_atts, image_embeds.detach())
        else:  # ContextBLIP: gradient flows back through the fusion encoder into the adapted image_embeds
            attention, text_states = text_cross_attention(model, enc_ids, text_atts, image_embeds)
            text_states = self.text_adapter(text_states)
        masked, visible = select_masked_patches(attention, self.mask_ratio)
        encoded = self.embed(model.visual_encoder(images, keep=visible))  # (B, 1 + V, width): adapter trains
        num_patches = attention.shape[1]
        tokens = self.mask_token.to(encoded.dtype).expand(bs, 1 + num_patches, -1).clone()
        tokens[:, 0] = encoded[:, 0]
        tokens = tokens.scatter(1, (visible + 1)[:, :, None].expand(-1, -1, tokens.shape[-1]), encoded[:, 1:])
        x = tokens + self.pos_embed
        text_bias = padding_mask_to_bias(text_atts, x.dtype)
        for layer in self.layers:
            x = layer(x, None, is_causal=False, encoder_hidden_states=text_states.to(x.dtype), encoder_bias=text_bias)
        gather = (masked + 1)[:, :, None]
        predicted = self.head(x.gather(1, gather.expand(-1, -1, x.shape[-1])))
        target = patchify(images, self.patch_size).gather(1, masked[:, :, None].expand(-1, -1, predicted.shape[-1]))
        return F.mse_loss(predicted.float(), target.float())


def attach_context_adapter(model, cfg: dict) -> None:
    """Add the multi-scale adapter to both ViTs (online and momentum) and, with tmim_weight > 0, the TMIM
    decoder; set the loss weights (ITC off by default, as in ContextBLIP)."""
    vit = model.visual_encoder
    depth, width = len(vit.blocks), vit.embed_dim
    bad = [layer for layer in cfg["layers"] if layer > depth]
    if bad:
        raise ConfigError(f"config key 'finetune.adapter.layers' {cfg['layers']}: the ViT has only {depth} blocks")
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        encoder.adapter = MultiScaleAdapter(width, cfg["layers"], cfg["reduction"], cfg["gate"])
    model.visual_encoder_m.adapter.load_state_dict(model.visual_encoder.adapter.state_dict())
    model.itc_weight = cfg["itc_weight"]
    model.tmim_weight = cfg["tmim_weight"]
    if cfg["tmim_weight"] > 0:
        model.tmim = TMIM(
            width,
            model.med_config.hidden_size,
            vit.num_patches,
            vit.patch_embed.patch_size[0],
            cfg["mask_ratio"],
            cfg["decoder_width"],
            cfg["decoder_depth"],
            cfg["decoder_heads"],
            cfg["tmim_text"],
        )
    model.itm_negative_source = cfg["itm_negatives"]

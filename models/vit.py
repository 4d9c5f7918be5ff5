"""The BLIP image encoder: a timm VisionTransformer that returns every token.

Parameter names and shapes are those of the official `visual_encoder.*` keys:
patch 16, class token, qkv bias, LayerNorm eps 1e-6, no head. We subclass timm's model for its layers
and initialisation, and own `forward` so that it returns the whole normalised sequence and checkpoints
only the last `ckpt_layer` blocks, as the official code does (with torch.utils.checkpoint, no fairscale).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

# Official sizes. Large always uses drop path 0.1 in the official create_vit, whatever the caller asks.
VIT_SIZES: dict[str, dict] = {
    "base": {"width": 768, "depth": 12, "heads": 12, "patch_size": 16, "drop_path_rate": 0.0},
    "large": {"width": 1024, "depth": 24, "heads": 16, "patch_size": 16, "drop_path_rate": 0.1},
}


def vit_spec(vit: str | dict) -> dict:
    """Resolve the `vit` config value (`base`, `large` or a mapping) to a full size mapping."""
    if isinstance(vit, str):
        if vit not in VIT_SIZES:
            raise ValueError(
                f"vit must be 'base', 'large' or a mapping {{width, depth, heads, patch_size}}, got {vit!r}"
            )
        return dict(VIT_SIZES[vit])
    spec = {"patch_size": 16, "mlp_ratio": 4.0, "drop_path_rate": 0.0, **vit}
    missing = [k for k in ("width", "depth", "heads") if k not in spec]
    if missing:
        raise ValueError(f"vit mapping is missing {missing}; expected keys width, depth, heads[, patch_size]")
    return spec


class VisionTransformer(TimmVisionTransformer):
    """timm ViT whose forward returns (B, 1 + num_patches, width) after the final LayerNorm."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        ckpt_layer: int = 0,
    ):
        super().__init__(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
        )
        self.image_size = image_size
        self.ckpt_layer = ckpt_layer
        # ContextBLIP's multi-scale adapter (models/context_adapter.py), set by finetune.method adapter: it reads
        # the outputs of some blocks and adds its result to the final output.
        self.adapter: nn.Module | None = None
        # Visual prompt tokens (models/peft_methods.VisionPrompt), set by finetune.method prompt with
        # prompt.vision_tokens > 0: inserted after the class token before the blocks, dropped from the output.
        self.prompt: nn.Module | None = None

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(
        self, images: torch.Tensor, keep: torch.Tensor | None = None, with_base: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`keep` (B, K) patch indices: encode only those patches (and the class token), as masked image
        modelling does with the visible patches; the output is then (B, 1 + K, width). `with_base`: return
        (output, output before the adapter) (the same tensor twice without an adapter)."""
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        if keep is not None:
            patches = x[:, 1:].gather(1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        x = self.pos_drop(x)
        if self.prompt is not None:
            x = self.prompt(x)
        first_ckpt = len(self.blocks) - self.ckpt_layer
        taps = []
        for i, block in enumerate(self.blocks):
            # Checkpoint the last ckpt_layer blocks: they hold the largest activations at the end of
            # the backward pass, and recomputing them trades ~1/3 more ViT compute for memory.
            if i >= first_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if self.adapter is not None and i in self.adapter.block_indices:
                taps.append(self.norm(x))
        x = self.norm(x)
        if self.prompt is not None:  # the output keeps the shape (B, 1 + patches, width) that every consumer reads
            x = self.prompt.drop(x)
        adapted = x if self.adapter is None else self.adapter(x, taps)
        return (adapted, x) if with_base else adapted


def create_vit(
    vit: str | dict,
    image_size: int,
    grad_ckpt: bool = False,
    ckpt_layer: int | str = 0,
    drop_path_rate: float | None = None,
    layer_norm_eps: float = 1e-6,
) -> tuple[VisionTransformer, int]:
    """Build the image encoder; returns (encoder, width). `drop_path_rate=None` keeps the official default.
    `ckpt_layer="auto"` starts at 0; train_retrieval sets the number once it has measured the GPU's memory."""
    if ckpt_layer == "auto":
        ckpt_layer = 0
    spec = vit_spec(vit)
    if drop_path_rate is None:
        drop_path_rate = spec["drop_path_rate"]
    if image_size % spec["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the ViT patch size {spec['patch_size']}")
    encoder = VisionTransformer(
        image_size=image_size,
        patch_size=spec["patch_size"],
        width=spec["width"],
        depth=spec["depth"],
        heads=spec["heads"],
        mlp_ratio=spec.get("mlp_ratio", 4.0),
        drop_path_rate=drop_path_rate,
        layer_norm_eps=layer_norm_eps,
        ckpt_layer=ckpt_layer if grad_ckpt else 0,
    )
    return encoder, spec["width"]

"""BLIP captioning model: the ViT and the MED decoder (`visual_encoder.*`, `text_decoder.*`).

Behaviour follows the official BLIP_Decoder:
- captions are `prompt + pre_caption(caption)`, tokenised with [DEC] (the bos token) in place of [CLS], truncated at
  40 tokens (`caption_max_tokens`) and padded to the batch's longest;
- the LM loss skips the prompt tokens ([DEC] and the prompt words get label -100, as does padding) and uses label
  smoothing 0.1, averaged over the remaining tokens of the batch;
- generation starts from `[DEC] + prompt` (no [SEP]); the caption is the decoded text minus the prompt's characters.
Generation itself lives in engine/generation.py; this module gives it `prompt_ids`, `image_kv` and `decode_step`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blip_retrieval import build_from_config
from models.med import BertLMHeadModel, MedConfig
from models.vit import create_vit


class BlipCaption(nn.Module):
    def __init__(
        self,
        med_config: MedConfig,
        tokenizer,
        vit: str | dict = "base",
        image_size: int = 384,
        vit_grad_ckpt: bool = False,
        vit_ckpt_layer: int = 0,
        vit_drop_path_rate: float | None = None,
        vit_layer_norm_eps: float = 1e-6,
        prompt: str = "a picture of ",
        max_tokens: int = 40,
        label_smoothing: float = 0.1,
    ):
        super().__init__()
        self.tokenizer = tokenizer  # not a module: not in the state dict
        if len(tokenizer) > med_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but med_config vocab_size is "
                f"{med_config.vocab_size}; they must match (30524 for bert-base-uncased + [DEC], [ENC])"
            )
        self.visual_encoder, vision_width = create_vit(
            vit, image_size, vit_grad_ckpt, vit_ckpt_layer, vit_drop_path_rate, vit_layer_norm_eps
        )
        med_config = MedConfig(**{**med_config.to_dict(), "encoder_width": vision_width})
        self.med_config = med_config
        self.text_decoder = BertLMHeadModel(med_config)
        self.bos_token_id = tokenizer.convert_tokens_to_ids("[DEC]")  # the bos token (added by init_tokenizer)
        self.eos_token_id = tokenizer.sep_token_id  # [SEP] ends a caption
        self.pad_token_id = tokenizer.pad_token_id
        self.max_tokens = max_tokens
        self.label_smoothing = label_smoothing
        self.set_prompt(prompt)

    def set_prompt(self, prompt: str) -> None:
        """The text every caption starts with; `prompt_length` counts [DEC] and the prompt's tokens."""
        self.prompt = prompt
        self.prompt_length = len(self.tokenizer(prompt).input_ids) - 1  # without the trailing [SEP]

    def prompt_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, prompt_length): [DEC] then the prompt's tokens, the start of every generated caption."""
        ids = torch.tensor(self.tokenizer(self.prompt).input_ids[:-1], device=device)
        ids[0] = self.bos_token_id
        return ids[None].expand(batch, -1).contiguous()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, 1 + N, D) for cross-attention."""
        return self.visual_encoder(images)

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values of each image, computed once per generation."""
        return self.text_decoder.image_kv(image_embeds)

    def decode_step(self, input_ids, past, image_kv):
        """See BertLMHeadModel.decode_step."""
        return self.text_decoder.decode_step(input_ids, past, image_kv)

    def tokenize_captions(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (with [DEC] first) and attention mask of full captions (prompt included), padded to the longest."""
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(device)
        ids[:, 0] = self.bos_token_id
        return ids, tokens["attention_mask"].to(device)

    def lm_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Targets: the ids with padding and the prompt ([DEC] + prompt tokens) set to -100 (official)."""
        labels = input_ids.masked_fill(input_ids == self.pad_token_id, -100)
        labels[:, : self.prompt_length] = -100
        return labels

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The LM loss of `captions` (each already `prompt + pre_caption(text)`) given `images`."""
        image_embeds = self.encode_image(images)
        ids, mask = self.tokenize_captions(captions, images.device)
        _, loss = self.text_decoder(ids, mask, image_embeds, self.lm_labels(ids), self.label_smoothing)
        return loss

    def decode(self, sequences: torch.Tensor) -> list[str]:
        """Generated ids -> captions: decoded without special tokens, minus the prompt's characters (official)."""
        texts = self.tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=True)
        return [text[len(self.prompt) :] for text in texts]


def build_caption_model(config: dict, tokenizer=None) -> BlipCaption:
    """Build the caption model from a resolved config (configs/schema.py keys, the captioning block included)."""
    return build_from_config(
        BlipCaption,
        config,
        tokenizer,
        prompt=config["prompt"],
        max_tokens=config["caption_max_tokens"],
        label_smoothing=config["label_smoothing"],
    )

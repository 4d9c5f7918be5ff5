"""BLIP retrieval model: ITC (contrastive, momentum distillation, feature queues) + ITM (hard negatives).

Behaviour follows the official BLIP_Retrieval. Attribute names are the official state-dict prefixes
(`visual_encoder`, `text_encoder`, `vision_proj`, `text_proj`, `itm_head`, `temp`, the `*_m` momentum copies,
`image_queue`, `text_queue`, `idx_queue`, `ptr_queue`), so official checkpoints load without renaming.

Fixes of official traps, each behaviour-preserving where the official code works:
- gathers are identities in a single process, so nothing needs torch.distributed;
- hard negatives are sampled in one vectorised call, and a row with no valid negative (every other item
  shares its image, or the softmax underflowed) falls back to a uniform choice instead of crashing;
- the queue-size / global-batch constraint is checked with a message that says which batch sizes work.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from models.med import BertModel, MedConfig
from models.vit import create_vit
from utils import ConfigError, all_gather_concat, all_gather_with_grad, get_rank, get_world_size


def init_tokenizer(text_encoder: str = "bert-base-uncased"):
    """BERT WordPiece tokenizer with `[DEC]` (bos) and `[ENC]` added, as in the official code.

    `text_encoder` is a hub name, a local directory with tokenizer files, or a path to a `vocab.txt`.
    With bert-base-uncased the new ids are [DEC]=30522 and [ENC]=30523 (vocab 30524).
    """
    from transformers import BertTokenizerFast

    offline_hint = (
        "Without network access, download it once elsewhere (e.g. `huggingface-cli download "
        "bert-base-uncased vocab.txt tokenizer_config.json --local-dir DIR`) and set text_encoder to "
        "that local directory or to its vocab.txt."
    )
    # Hub ids look like "name" or "org/name"; anything else that is not on disk fails here, before the hub
    # client spends minutes retrying a name that cannot exist there.
    first_dir = text_encoder.split("/")[0]
    looks_like_path = (
        text_encoder.startswith((".", "/", "~"))
        or text_encoder.endswith((".txt", ".json"))
        or (text_encoder.count("/") >= 1 and os.path.isdir(first_dir))
    )
    if looks_like_path and not os.path.exists(os.path.expanduser(text_encoder)):
        raise OSError(f"tokenizer path {text_encoder!r} (config key text_encoder) does not exist. {offline_hint}")
    try:
        if os.path.isfile(text_encoder):
            tokenizer = BertTokenizerFast(text_encoder, do_lower_case=True)  # positional: v4 and v5 name it differently
        else:
            tokenizer = BertTokenizerFast.from_pretrained(os.path.expanduser(text_encoder))
    except (OSError, ValueError) as e:
        raise OSError(
            f"could not load the BERT tokenizer {text_encoder!r} (config key text_encoder): {e}\n{offline_hint}"
        ) from None
    # Some transformers versions return a tokenizer holding only the special tokens when nothing was found
    # (e.g. offline with no cache), which would silently turn every word into [UNK].
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise OSError(
            f"the tokenizer loaded from {text_encoder!r} (config key text_encoder) has no vocabulary "
            f"beyond its special tokens. {offline_hint}"
        )
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def sample_hard_negatives(
    sim: torch.Tensor, positive: torch.Tensor, hard_fraction: float = 1.0, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one ITM negative per row: multinomial over softmax(sim) with positives zeroed (official).

    `floor` is added to every softmax weight before the positives are zeroed (ContextBLIP's released sampler adds
    1e-4; BLIP adds nothing).

    sim: (B, C) similarities already divided by temp; positive: (B, C) bool, True where the candidate shares
    the row's image. `hard_fraction` < 1 draws from the mixture hard_fraction x hard + (1 - hard_fraction) x
    uniform over the candidates of other images (0: uniform negatives; see `itm_hard_fraction`); 1 is the
    official sampler, bit for bit. Rows whose hard weights are all zero or not finite (no candidate of another
    image, or an underflow) draw uniformly among candidates of other images, or among all candidates if there
    are none. Returns (indices (B,), number of such fallback rows as a 0-d tensor: no host sync).
    """
    weights = (F.softmax(sim.float(), dim=1) + floor).masked_fill(positive, 0.0)
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    invalid = weights.sum(dim=1) <= 0
    uniform = (~positive).float()
    uniform = torch.where(uniform.sum(dim=1, keepdim=True) > 0, uniform, torch.ones_like(uniform))
    if hard_fraction < 1.0:
        hard = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        weights = hard_fraction * hard + (1.0 - hard_fraction) * uniform / uniform.sum(dim=1, keepdim=True)
        if hard_fraction == 0.0:
            invalid = torch.zeros_like(invalid)  # nothing falls back: the uniform draw is the intended one
    weights = torch.where(invalid[:, None], uniform, weights)
    return torch.multinomial(weights, 1).squeeze(1), invalid.sum()


TEXT_COMPUTE = ("trimmed", "static", "official")  # BlipRetrieval.forward `text_compute`


class BlipRetrieval(nn.Module):
    has_itm = True  # the evaluator re-ranks with itm_logits (models/clip.py: False)

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
        embed_dim: int = 256,
        queue_size: int = 57600,
        momentum: float = 0.995,
        negative_all_rank: bool = False,
        max_length: int = 35,
    ):
        super().__init__()
        self.tokenizer = tokenizer  # not a module: not in the state dict
        self.enc_token_id = tokenizer.enc_token_id
        if len(tokenizer) > med_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but med_config vocab_size is "
                f"{med_config.vocab_size}; they must match (30524 for bert-base-uncased + [DEC], [ENC])"
            )
        self.max_length = max_length
        self.visual_encoder, vision_width = create_vit(
            vit, image_size, vit_grad_ckpt, vit_ckpt_layer, vit_drop_path_rate, vit_layer_norm_eps
        )
        med_config = MedConfig(**{**med_config.to_dict(), "encoder_width": vision_width})
        self.med_config = med_config
        self.text_encoder = BertModel(med_config)
        text_width = med_config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum encoders: built like the main ones (the official momentum ViT is never checkpointed).
        self.visual_encoder_m, _ = create_vit(vit, image_size, False, 0, vit_drop_path_rate, vit_layer_norm_eps)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(med_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]
        self.copy_params()

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.temp = nn.Parameter(torch.tensor(0.07))  # learnable, decayed like every parameter (official)
        self.queue_size = queue_size
        self.momentum = momentum
        self.negative_all_rank = negative_all_rank
        # Parameter-efficient fine-tuning (models/peft_methods.py) changes these: the ITC loss weight (ContextBLIP
        # trains ITM + TMIM only) and the TMIM module (models/context_adapter.py), None when off.
        self.itc_weight = 1.0
        self.tmim: nn.Module | None = None
        self.tmim_weight = 0.0
        # "blip": ITM hard negatives from the (adapted) ITC similarities / temp; "contextblip": ContextBLIP's released
        # sampler, from the cosines of the features before the adapter (finetune.adapter.itm_negatives).
        self.itm_negative_source = "blip"

    # ----------------------------------------------------------------------------------------------
    # Encoders shared by training and evaluation
    # ----------------------------------------------------------------------------------------------
    # Eager under torch.compile: traced, the tokenizer's Python would be guarded on every token id and
    # recompiled for every batch of captions.
    @torch.compiler.disable
    def tokenize(
        self, captions: list[str], device: torch.device | None = None, pad_to_longest: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, truncated to max_length (35) and padded to it as in the official code,
        or with `pad_to_longest` only to the longest caption (the same outputs: padding is masked)."""
        tokens = self.tokenizer(
            captions,
            padding="longest" if pad_to_longest else "max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = device or self.temp.device
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def with_enc_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ITM always reads the [ENC] position: replace the leading [CLS] with [ENC]."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        return ids

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image_embeds (B, 1+N, D) for cross-attention, image_feat (B, embed_dim) unit ITC vectors)."""
        image_embeds = self.visual_encoder(images)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool = True) -> torch.Tensor:
        """Unit ITC text vectors (B, embed_dim) from the [CLS] position of the text-only pass.

        `cls_only=False` runs the full last layer as the official code does (same numbers, more FLOPs).
        """
        hidden = self.text_encoder(input_ids, attention_mask, mode="text", cls_only=cls_only)
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def itm_logits(
        self,
        enc_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cls_only: bool = True,
    ) -> torch.Tensor:
        """ITM logits (B, 2) (index 1 = match) for ids that already start with [ENC].

        Pass either `image_embeds` (one image per text) or `image_kv` from `text_encoder.cross_attention_kv`
        (G images, texts grouped contiguously, B a multiple of G). `cls_only`: see BertModel.forward.
        """
        hidden = self.text_encoder(
            enc_input_ids,
            attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_kv=image_kv,
            mode="multimodal",
            cls_only=cls_only,
        )
        return self.itm_head(hidden[:, 0]).float()

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        caption: list[str],
        alpha: float,
        idx: torch.Tensor,
        hard_negative_fraction: float = 1.0,
        text_compute: str = "trimmed",
        update_queues: bool = True,
    ) -> dict:
        """Training losses and ITM statistics, all tensors (no host sync): {'loss' (what is optimised: loss_ita +
        loss_itm by default), 'loss_ita', 'loss_itm', 'loss_tmim' (0 unless the ContextBLIP adapter trains),
        'itm_acc_pos' (share of matching pairs the ITM head calls a match), 'itm_acc_neg' (share of negative
        pairs it calls a mismatch), 'num_neg_fallback'}.

        hard_negative_fraction: see sample_hard_negatives (1 = the official hard negatives).
        text_compute: the text tower's work, the same math each way. "trimmed": captions padded to the batch's
            longest, and the last layer computes only position 0, the only one read (BertModel.forward `cls_only`).
            "static": the same with captions padded to max_length, one text shape for torch.compile. "official":
            max_length padding and every position of the last layer, the official amount of work (benchmarks).
        update_queues: False leaves the ITC queues unwritten (the memory probe of `vit_ckpt_layer: auto`).
        """
        if text_compute not in TEXT_COMPUTE:
            raise ValueError(f"text_compute must be one of {TEXT_COMPUTE}, got {text_compute!r}")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        idx = idx.view(-1, 1)
        bs = image.shape[0]

        if self.itm_negative_source == "contextblip":
            image_embeds, base_embeds = self.visual_encoder(image, with_base=True)
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        else:
            image_embeds, image_feat = self.encode_image(image)
        # Negatives gathered from all ranks need one text shape on every rank: that mode keeps max_length padding.
        cls_only = text_compute != "official"
        pad_to_longest = text_compute == "trimmed" and not self.negative_all_rank
        text_ids, text_atts = self.tokenize(caption, image.device, pad_to_longest=pad_to_longest)
        text_feat = self.encode_text(text_ids, text_atts, cls_only=cls_only)

        # ITC targets: every column holding the same image id is a positive (in batch and in the queue).
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(dim=1, keepdim=True)

        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]).float(), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_hidden_m = self.text_encoder_m(text_ids, text_atts, mode="text", cls_only=cls_only)
            text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]).float(), dim=-1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = image_feat @ text_feat_m_all / self.temp
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets).sum(dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2

        idxs = all_gather_concat(idx)
        if update_queues:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m, idxs)

        # ITM: positives, then one hard negative image per text and one hard negative text per image.
        enc_ids = self.with_enc_token(text_ids)
        with torch.no_grad():
            if self.itm_negative_source == "contextblip":
                # ContextBLIP's released sampler: cosines of the frozen features before the adapter, not divided
                # by the temperature, + 1e-4, only the pair itself masked (not other captions of its image).
                sample_feat, temp, floor = F.normalize(self.vision_proj(base_embeds[:, 0]).float(), dim=-1), 1.0, 1e-4
            else:
                sample_feat, temp, floor = image_feat, self.temp, 0.0
            if self.negative_all_rank:
                if self.itm_negative_source == "contextblip":
                    columns = torch.arange(bs, device=image.device) + get_rank() * bs
                    positive = F.one_hot(columns, bs * get_world_size()).bool()
                else:
                    positive = torch.eq(idx, idxs.t())
                image_feat_world = all_gather_concat(sample_feat)
                text_feat_world = all_gather_concat(text_feat)
                sim_i2t_hard = sample_feat @ text_feat_world.t() / temp
                sim_t2i_hard = text_feat @ image_feat_world.t() / temp
            else:
                if self.itm_negative_source == "contextblip":
                    positive = torch.eye(bs, dtype=torch.bool, device=image.device)
                else:
                    positive = torch.eq(idx, idx.t())
                sim_i2t_hard = sample_feat @ text_feat.t() / temp
                sim_t2i_hard = text_feat @ sample_feat.t() / temp
            neg_image_idx, fallback_t2i = sample_hard_negatives(sim_t2i_hard, positive, hard_negative_fraction, floor)
            neg_text_idx, fallback_i2t = sample_hard_negatives(sim_i2t_hard, positive, hard_negative_fraction, floor)
        if self.negative_all_rank:
            image_embeds_world = all_gather_with_grad(image_embeds)  # negatives get gradient on their owner rank
            ids_world, atts_world = all_gather_concat(enc_ids), all_gather_concat(text_atts)
        else:
            image_embeds_world, ids_world, atts_world = image_embeds, enc_ids, text_atts
        image_embeds_neg = image_embeds_world[neg_image_idx]
        text_ids_neg, text_atts_neg = ids_world[neg_text_idx], atts_world[neg_text_idx]

        # One pass over the 3B pairs: (text b, image b), (text b, negative image), (negative text, image b).
        # Rows are independent, so this equals the official positive pass followed by the 2B negative pass.
        all_ids = torch.cat([enc_ids, enc_ids, text_ids_neg], dim=0)
        all_atts = torch.cat([text_atts, text_atts, text_atts_neg], dim=0)
        all_images = torch.cat([image_embeds, image_embeds_neg, image_embeds], dim=0)
        itm_logits = self.itm_logits(all_ids, all_atts, all_images, cls_only=cls_only)
        itm_labels = torch.zeros(3 * bs, dtype=torch.long, device=image.device)
        itm_labels[:bs] = 1
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        loss = loss_itm + self.itc_weight * loss_ita if self.itc_weight else loss_itm
        loss_tmim = torch.zeros((), device=image.device)
        if self.tmim is not None:
            loss_tmim = self.tmim(self, image, image_embeds, enc_ids, text_atts)
            loss = loss + self.tmim_weight * loss_tmim
        with torch.no_grad():
            called_match = itm_logits.argmax(dim=1) == 1
            itm_acc_pos = called_match[:bs].float().mean()
            itm_acc_neg = 1.0 - called_match[bs:].float().mean()
        return {
            "loss": loss,
            "loss_ita": loss_ita,
            "loss_itm": loss_itm,
            "loss_tmim": loss_tmim,
            "itm_acc_pos": itm_acc_pos,
            "itm_acc_neg": itm_acc_neg,
            "num_neg_fallback": fallback_t2i + fallback_i2t,
        }

    def momentum_param_pairs(self, trainable_only: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(online, momentum) parameters paired by name within each (encoder, momentum encoder) pair.

        Raises RuntimeError when a pair's parameter names differ (e.g. adapters injected into the online encoder
        only), instead of silently pairing unrelated tensors by position. `trainable_only`: only the pairs whose
        online parameter trains; the frozen rest of a parameter-efficient run stays bitwise equal to its copy.
        """
        params, params_m = [], []
        for model, model_m in self.model_pairs:
            online, momentum = dict(model.named_parameters()), dict(model_m.named_parameters())
            if online.keys() != momentum.keys():
                only_online = sorted(online.keys() - momentum.keys())[:3]
                only_momentum = sorted(momentum.keys() - online.keys())[:3]
                raise RuntimeError(
                    f"online and momentum encoders have different parameters (only online: {only_online}, only "
                    f"momentum: {only_momentum}); adapters must be added to both (models/peft_methods.py)"
                )
            for name, p in online.items():
                if p.requires_grad or not trainable_only:
                    params.append(p)
                    params_m.append(momentum[name])
        return params, params_m

    @torch.no_grad()
    def copy_params(self) -> None:
        params, params_m = self.momentum_param_pairs()
        for p, p_m in zip(params, params_m, strict=True):
            p_m.data.copy_(p.data)
            p_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self) -> None:
        # Only pairs whose online parameter trains: in full fine-tuning that is every pair (official); with
        # adapters it is the adapters, and the frozen weights are never touched (m * x + (1 - m) * x can differ
        # from x in the last bit, which would make the frozen copies drift).
        params, params_m = self.momentum_param_pairs(trainable_only=True)
        if not params:
            return
        # theta_m <- m * theta_m + (1 - m) * theta, one fused call over all tensors.
        torch._foreach_mul_(params_m, self.momentum)
        torch._foreach_add_(params_m, params, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idxs: torch.Tensor) -> None:
        image_feats = all_gather_concat(image_feat)
        text_feats = all_gather_concat(text_feat)
        global_batch = image_feats.shape[0]
        check_queue_size(self.queue_size, global_batch)
        # Column indices computed on the device: reading the pointer with int() would stall the GPU every step.
        columns = self.ptr_queue + torch.arange(global_batch, device=self.ptr_queue.device)
        self.image_queue.index_copy_(1, columns, image_feats.t().to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, columns, text_feats.t().to(self.text_queue.dtype))
        self.idx_queue.index_copy_(1, columns, idxs.t())
        self.ptr_queue.copy_((self.ptr_queue + global_batch) % self.queue_size)


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """The queue is written in whole global batches with no wrap-around, so the batch must divide it."""
    if queue_size % global_batch:
        good = [b for b in range(1, min(queue_size, 4096) + 1) if queue_size % b == 0 and b >= global_batch // 2][:6]
        raise ValueError(
            f"queue_size {queue_size} is not a multiple of the global batch {global_batch} "
            f"(batch_size_train x world size {get_world_size()}). Choose queue_size as a multiple of "
            f"{global_batch} (e.g. {global_batch * (queue_size // global_batch)}) or a global batch "
            f"that divides it (e.g. {good})."
        )


def build_from_config(model_cls: type[nn.Module], config: dict, tokenizer=None, **model_kwargs) -> nn.Module:
    """`model_cls(med_config, tokenizer, <the ViT keys>, **model_kwargs)` with the tokenizer and the MED config read
    from the config keys (`text_encoder`, `med_config`): the one path from a config to a BLIP network, shared by the
    retrieval, caption and composed-retrieval models. `model_kwargs` may override a ViT argument."""
    # The tokenizer, the MED config and the model constructor raise OSError / ValueError on bad values; here, where
    # those values come from config keys, they become ConfigError (one line from the CLI, no traceback).
    try:
        if tokenizer is None:
            tokenizer = init_tokenizer(config["text_encoder"])
        med = config["med_config"]
        if isinstance(med, dict):
            med_config = MedConfig.from_dict({"vocab_size": len(tokenizer), **med}, source="config key med_config")
        else:
            med_config = MedConfig.from_json(med)
        vit_kwargs = {
            "vit": config["vit"],
            "image_size": config["image_size"],
            "vit_grad_ckpt": config["vit_grad_ckpt"],
            "vit_ckpt_layer": config["vit_ckpt_layer"],
            "vit_drop_path_rate": config["drop_path_rate"],
            "vit_layer_norm_eps": config["vit_layer_norm_eps"],
        }
        return model_cls(med_config, tokenizer, **{**vit_kwargs, **model_kwargs})
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err


def build_model(config: dict, tokenizer=None) -> BlipRetrieval:
    """Build the retrieval model from a resolved config (see configs.schema.DEFAULT_CONFIG for the keys).

    Every key is read, so a partial dict must be merged over the defaults first: `{**DEFAULT_CONFIG, **config}`.
    """
    return build_from_config(
        BlipRetrieval,
        config,
        tokenizer,
        embed_dim=config["embed_dim"],
        queue_size=config["queue_size"],
        momentum=config["momentum"],
        negative_all_rank=config["negative_all_rank"],
        max_length=config["max_length"],
    )

"""MED: the BERT text tower of BLIP, with cross-attention to image tokens in every layer.

Written from the official model's behaviour; the state-dict names are the official ones
(`embeddings.word_embeddings`, `encoder.layer.N.crossattention.self.key`, ...), so official checkpoints load
without renaming. Differences from a stock BERT, all deliberate:
- no token-type embeddings;
- cross-attention key/value take `encoder_width` inputs (768 for ViT-B, 1024 for ViT-L);
- `mode='text'` skips cross-attention, `mode='multimodal'` runs it in every layer;
- masks are bidirectional unless `is_decoder=True` (captioning decoder), padding adds -10000 to the scores.

Cross-attention can also take precomputed image keys/values (`encoder_kv`, from `cross_attention_kv`): the
fast evaluation path projects each image's tokens once per layer and reuses them for every text scored
against that image, instead of once per (image, text) pair.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -10000.0  # the official additive constant for padded positions


@dataclass
class MedConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    encoder_width: int = 768
    add_cross_attention: bool = True

    # Fields of the official med_config.json that do not change the architecture.
    IGNORED_FIELDS = (
        "architectures",
        "model_type",
        "type_vocab_size",
        "add_type_embeddings",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "use_cache",
        "torch_dtype",
        "transformers_version",
        "label_smoothing",
        "position_embedding_type",
    )

    @classmethod
    def from_dict(cls, values: dict, source: str = "med_config") -> MedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k not in known and k not in cls.IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"{source}: unknown MED config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> MedConfig:
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"med_config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"med_config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(values, source=path)

    def to_dict(self) -> dict:
        return asdict(self)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported hidden_act {name!r}; expected gelu, gelu_new or relu")


def padding_mask_to_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias: 0 where attended, -10000 on padding."""
    return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE).to(dtype)


class BertEmbeddings(nn.Module):
    def __init__(self, config: MedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent, as in the official checkpoints (the key `embeddings.position_ids` is in every .pth).
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """`start`: position of the first token (a cached decoding step feeds one token at position `start`)."""
        positions = self.position_ids[:, start : start + input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: MedConfig, is_cross_attention: bool):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        kv_states: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
        query_len: int | None = None,
    ) -> torch.Tensor:
        """Attention of `hidden_states` over itself, over `kv_states`, or over precomputed `kv`.

        With `query_len`, only the first `query_len` positions ask (keys and values still cover every position).

        With precomputed `kv` of batch G and text batch B = G*m, texts [g*m, (g+1)*m) attend to image g.
        Cross-attention queries are independent of each other, so the m texts of one image are folded
        into one long query sequence and share the image's keys/values without copying them.
        """
        queries = hidden_states if query_len is None else hidden_states[:, :query_len]
        batch, length, width = queries.shape
        q = self.split_heads(self.query(queries))
        if kv is None:
            k, v = self.project_kv(hidden_states if kv_states is None else kv_states)
        else:
            k, v = kv
        dropout_p = self.dropout_p if self.training else 0.0
        groups = k.shape[0]
        if groups != batch:
            if attn_bias is not None or batch % groups:
                raise ValueError(
                    f"shared keys/values of batch {groups} need a text batch that is a multiple of "
                    f"it and no key mask; got text batch {batch}"
                )
            per_group = batch // groups
            q = q.view(groups, per_group, self.num_heads, length, self.head_dim).transpose(1, 2)
            q = q.reshape(groups, self.num_heads, per_group * length, self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            out = out.view(groups, self.num_heads, per_group, length, self.head_dim).transpose(1, 2)
            return (
                out.reshape(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, width)
            )
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, is_causal=is_causal and attn_bias is None
        )
        return out.transpose(1, 2).reshape(batch, length, width)


class BertSelfOutput(nn.Module):
    """Output projection, dropout, residual and post-LayerNorm (used after attention and after the FFN)."""

    def __init__(self, config: MedConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: MedConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, query_len: int | None = None, **attention_kwargs) -> torch.Tensor:
        residual = hidden_states if query_len is None else hidden_states[:, :query_len]
        return self.output(self.self(hidden_states, query_len=query_len, **attention_kwargs), residual)


class BertIntermediate(nn.Module):
    def __init__(self, config: MedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: MedConfig):
        super().__init__()
        self.attention = BertAttention(config)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_bias: torch.Tensor | None,
        is_causal: bool,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_bias: torch.Tensor | None = None,
        encoder_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        query_len: int | None = None,
    ) -> torch.Tensor:
        """`query_len`: compute outputs for the first `query_len` positions only (the rest are not returned)."""
        x = self.attention(hidden_states, attn_bias=self_bias, is_causal=is_causal, query_len=query_len)
        if encoder_hidden_states is not None or encoder_kv is not None:
            x = self.crossattention(x, attn_bias=encoder_bias, kv_states=encoder_hidden_states, kv=encoder_kv)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: MedConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The text encoder (`text_encoder.*` keys). Returns the last hidden states (B, L, hidden)."""

    def __init__(self, config: MedConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)
        # Learnable prompt tokens (models/peft_methods.TextPrompt), set by finetune.method prompt: inserted after
        # position 0 of the embedded text, with the attention mask extended to cover them.
        self.prompt: nn.Module | None = None

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def cross_attention_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (key, value) of image tokens, each (B_img, heads, N_img, head_dim)."""
        return [layer.crossattention.self.project_kv(image_embeds) for layer in self.encoder.layer]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        mode: str = "multimodal",
        is_decoder: bool = False,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Last hidden states (B, L, hidden), or (B, 1, hidden) with `cls_only`.

        `cls_only`: retrieval reads only position 0 ([CLS] for ITC, [ENC] for ITM). Its last-layer output needs
        every position's keys and values but no other position's query, cross-attention or FFN, so the last
        layer computes position 0 alone: the same numbers, about 7% fewer FLOPs for BERT-base at 35 tokens.
        """
        if cls_only and is_decoder:
            raise ValueError("cls_only is for the bidirectional encoder, not the causal decoder")
        if mode not in ("text", "multimodal"):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        multimodal = mode == "multimodal"
        if multimodal and encoder_hidden_states is None and encoder_kv is None:
            raise ValueError("mode='multimodal' needs encoder_hidden_states (image tokens) or encoder_kv")
        if multimodal and not self.config.add_cross_attention:
            raise ValueError("this text encoder was built without cross-attention (add_cross_attention false)")
        hidden = self.embeddings(input_ids)
        if self.prompt is not None:
            hidden, attention_mask = self.prompt(hidden, attention_mask)
        dtype = hidden.dtype  # attention casts the bias to the query dtype (bf16 under autocast)
        self_bias = None
        if attention_mask is not None:
            self_bias = padding_mask_to_bias(attention_mask, dtype)
            if is_decoder:
                length = hidden.shape[1]
                causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
                self_bias = self_bias.masked_fill(~causal, MASK_VALUE)
        encoder_bias = None
        if multimodal and encoder_attention_mask is not None and encoder_kv is None:
            # The image mask is all ones in retrieval; skip the bias then so SDPA can use its fastest kernel.
            if not bool(encoder_attention_mask.all()):
                encoder_bias = padding_mask_to_bias(encoder_attention_mask, dtype)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            hidden = layer(
                hidden,
                self_bias,
                is_causal=is_decoder and self_bias is None,
                encoder_hidden_states=encoder_hidden_states if multimodal else None,
                encoder_bias=encoder_bias,
                encoder_kv=encoder_kv[i] if (multimodal and encoder_kv is not None) else None,
                query_len=1 if (cls_only and i == last) else None,
            )
        return hidden


class BertPredictionHead(nn.Module):
    """`cls.predictions.*`: transform (dense, act, LayerNorm) then the vocabulary projection."""

    def __init__(self, config: MedConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _activation(config.hidden_act)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias  # the official checkpoints carry both keys; they are one tensor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform.LayerNorm(self.act(self.transform.dense(hidden))))


class BertLMHeadModel(nn.Module):
    """The captioning decoder (`text_decoder.*` keys): causal self-attention, cross-attention, LM head.

    `forward` scores whole captions (training); `decode_step` extends captions one token at a time with a
    self-attention key/value cache and image keys/values projected once per image (`image_kv`), for generation.
    """

    def __init__(self, config: MedConfig):
        super().__init__()
        self.bert = BertModel(config)
        self.cls = nn.Module()
        self.cls.predictions = BertPredictionHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied, as in BERT

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, L, V), loss). The loss predicts token t+1 from positions <= t, averaged over the labels
        that are not -100 (official: label_smoothing 0.1, prompt and padding labelled -100)."""
        hidden = self.bert(input_ids, attention_mask, encoder_hidden_states=image_embeds, is_decoder=True)
        logits = self.cls.predictions(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=-100,
                label_smoothing=label_smoothing,
            )
        return logits, loss

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (key, value) of each image's tokens, computed once for a whole generation."""
        return self.bert.cross_attention_kv(image_embeds)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits of the last position (B, V) and the extended self-attention cache.

        `input_ids` (B, n): the prompt (n tokens, `past` None) or the newest token (n = 1) after `past`, the
        per-layer (key, value) of all earlier positions, each (B, heads, P, head_dim). `image_kv`: from `image_kv`
        for G images; rows [g*m, (g+1)*m) of the batch belong to image g (m = B / G, e.g. the beams of one image),
        and share its keys/values without copies. No padding: every row has the same length.
        """
        if past is not None and input_ids.shape[1] != 1:
            raise ValueError("with a cache, decode_step takes one new token per row")
        start = 0 if past is None else past[0][0].shape[2]
        hidden = self.bert.embeddings(input_ids, start=start)
        batch, length, width = hidden.shape
        new_past = []
        for i, layer in enumerate(self.bert.encoder.layer):
            attn = layer.attention.self
            q = attn.split_heads(attn.query(hidden))
            k, v = attn.project_kv(hidden)
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            new_past.append((k, v))
            # The prompt attends causally to itself; a single new token attends to every cached position.
            context = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and length > 1)
            x = layer.attention.output(context.transpose(1, 2).reshape(batch, length, width), hidden)
            x = layer.crossattention(x, kv=image_kv[i])
            hidden = layer.output(layer.intermediate(x), x)
        return self.cls.predictions(hidden[:, -1]), new_past

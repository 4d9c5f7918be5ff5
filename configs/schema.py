"""The config schema: every key a script reads, its default, type, accepted values and bounds; loading a YAML file
with `--options` overrides; and which keys each script honours (a key the running script does not use is refused).

Keys come in groups (`KEY_GROUPS`): every script shares the runtime, optimisation and model-construction keys; the
others belong to one task family. A family's scripts share one config file (the same YAML trains, evaluates, indexes
for search and scores IMAGECODE), so `SCRIPT_GROUPS` gives each script its family's groups, and a caption key given
to train_retrieval.py, or a CIRR key given to train_caption.py, is an error that names the key and the script.
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

import yaml

from utils import ConfigError, atomic_write

DEFAULT_CONFIG: dict[str, Any] = {
    # Official keys (configs/retrieval_flickr.yaml of the BLIP repository).
    "image_root": "",  # directory the annotation image paths are relative to
    "ann_root": "annotation",  # directory holding the annotation JSON files
    "dataset": "flickr",  # flickr | coco | custom
    "pretrained": "",  # checkpoint to start from: local .pth, http(s) URL or HF directory; '' = random init
    "vit": "base",  # base | large | mapping {width, depth, heads, patch_size, mlp_ratio} for small models
    "vit_grad_ckpt": False,  # activation checkpointing in the ViT
    "vit_ckpt_layer": 0,  # with vit_grad_ckpt, checkpoint the last N ViT blocks (official: 4); auto: fit GPU memory
    "batch_size_train": 32,  # per-process training batch size
    "batch_size_test": 64,  # per-process feature-extraction batch size in evaluation
    "init_lr": 1e-5,  # learning rate of epoch 0 (cosine schedule, no warmup)
    "image_size": 384,  # square input resolution
    "queue_size": 57600,  # ITC momentum queue length
    "alpha": 0.4,  # momentum-distillation weight (ramped linearly during epoch 0)
    "k_test": 128,  # candidates re-ranked by ITM per query in evaluation
    "negative_all_rank": False,  # sample ITM hard negatives from all ranks' batches
    "weight_decay": 0.05,  # AdamW weight decay (uniform over all parameters, as official)
    "min_lr": 0.0,  # learning rate floor of the cosine schedule
    "max_epoch": 6,  # number of training epochs
    # Learning-rate schedule and AdamW settings (engine/training.py implements them).
    "lr_schedule": "cosine_epoch",  # cosine_epoch (official: per epoch, no warmup) | cosine_step | step_decay
    "warmup_steps": 0,  # cosine_step / step_decay: linear warmup over this many optimizer steps; 0 = none
    "lr_decay_rate": 0.9,  # step_decay: the learning rate is multiplied by this every epoch
    "warmup_lr": 0.0,  # step_decay: the warmup's starting learning rate (ContextBLIP and BLIP pre-training: 1e-6)
    "optimizer_betas": [0.9, 0.999],  # AdamW betas (torch defaults, as the official code)
    "optimizer_eps": 1.0e-8,  # AdamW eps (torch default, as the official code)
    # Our keys.
    "text_encoder": "bert-base-uncased",  # hub name or local directory of a BERT tokenizer
    "med_config": "configs/med_config.json",  # path to, or mapping of, BERT config fields for the text tower
    "embed_dim": 256,  # ITC projection dimension
    "momentum": 0.995,  # EMA coefficient of the momentum encoders
    "max_words": 30,  # pre_caption word limit
    "min_scale": 0.5,  # training crop: RandomResizedCrop scale (min_scale, 1.0), official 0.5
    "max_length": 35,  # tokenizer max length
    "train_file": None,  # dataset custom: training annotation JSON
    "val_file": None,  # dataset custom: validation annotation JSON
    "test_file": None,  # dataset custom: test annotation JSON
    "amp": "bf16",  # training precision: bf16 | fp16 | none (official fp32); on CUDA, and on CPU only with amp_cpu
    "eval_amp": "none",  # evaluation precision: none (official fp32) | bf16 (about 3x faster fast-mode eval on GPU)
    "amp_cpu": False,  # with amp/eval_amp bf16, also autocast on CPU; pays off on CPUs with AVX512-BF16 or AMX
    "device": "auto",  # auto | cuda | cpu
    "seed": 42,  # base seed (each rank adds its rank)
    "num_workers": 4,  # DataLoader workers per process
    "train_augment": "official",  # official (crop + flip + RandomAugment) | crop (crop only) | none (eval resize)
    "autocontrast": "official",  # official (uint8 wrap: channels with min > 0 turn white) | fixed (true stretch)
    "eval_mode": "fast",  # fast (cached cross-attention K/V, batched) | official (per-query, reference path)
    "itm_batch_size": 1024,  # max image-text pairs per ITM forward in fast evaluation (padding kept within 10%)
    "rerank_score": "official",  # official (ITM match logit + cosine) | calibrated (log P_ITM(match) + cosine/temp)
    "itm_negatives": "hard",  # ITM negatives: hard (official) | uniform | warmup | anneal (see itm_hard_fraction)
    "itm_negatives_steps": 0,  # warmup: uniform negatives for this many optimizer steps; anneal: uniform -> hard
    "eval_every": 1,  # evaluate every N epochs (the last epoch is always evaluated)
    "select_epoch": "best",  # best (the best val score, BLIP's rule) | last (the last epoch, as CoVR reports)
    "grad_accum_steps": 1,  # micro-batches per optimizer step
    "clip_grad_norm": 0.0,  # max gradient norm; 0 = off (official)
    "log_every": 50,  # log training metrics every N steps
    "compile": False,  # wrap the model in torch.compile
    "tensorboard": False,  # also write TensorBoard scalars
    "vit_layer_norm_eps": 1e-6,  # ViT LayerNorm eps: 1e-6 official; HF BLIP directories set their own (1e-5)
    "drop_path_rate": None,  # ViT stochastic depth; None = official default (0 for base, 0.1 for large)
    # Photo search (search.py; engine/search_index.py, engine/search_query.py, engine/search_server.py).
    "search_feature_dtype": "float16",  # stored ITC image features: float16 (512 MB per 1M images) | float32
    "search_chunk_images": 1024,  # images per crash-safe chunk file while indexing (work lost to a kill)
    "search_block_rows": 65536,  # index rows per block of the exact ITC top-k (memory per block, not per index)
    "search_cache_images": 512,  # image tokens kept for re-ranking (LRU; ViT-B at 384 px: 0.9 MB each in bf16)
    # CLIP beside BLIP (models/clip.py): the model family, and which CLIP. image_size is then the model's own.
    "model": "blip",  # blip | clip (a dual encoder ranked by ITC alone: no ITM re-ranking, trained with InfoNCE)
    "clip_model": "",  # open_clip architecture (ViT-B-16, ViT-L-14-quickgelu or a model-config .json); "" = HF dir
    "clip_pretrained_tag": "",  # open_clip: tag the `pretrained` file was published under (openai, ...) or custom
    "clip_context_length": 77,  # CLIP text context in tokens (longer captions are truncated, end token kept)
    # BLIP-2 first stage beside BLIP (models/blip2.py; model: blip2). A Hugging Face directory as `pretrained` brings
    # its own architecture; LAVIS .pth files, our checkpoints and random initialisation take it from blip2_config.
    "blip2_config": "",  # '' = LAVIS eva_clip_g (ViT-g/14 + BERT-base Q-Former, 32 queries) at image_size | HF
    # Blip2 config.json path | mapping of Blip2Config fields (vision_config, qformer_config, num_query_tokens, ...)
    "blip2_freeze_vit": True,  # freeze the image encoder (BLIP-2 pre-training); false trains it (its COCO fine-tuning)
    # Captioning (caption.py, train_caption.py; official configs/caption_coco.yaml). The official max_length /
    # min_length are named gen_max_length / gen_min_length here: max_length is the retrieval tokenizer's limit.
    "prompt": "a picture of ",  # every caption starts with it; its tokens are not in the loss
    "caption_max_tokens": 40,  # training: [DEC] + prompt + caption truncated to this many tokens (official 40)
    "label_smoothing": 0.1,  # LM loss label smoothing (official 0.1)
    "num_beams": 3,  # beam search width (1 = greedy)
    "gen_max_length": 20,  # generated length limit in tokens, [DEC] and prompt included (transformers' max_length)
    "gen_min_length": 5,  # [SEP] is forbidden before this many tokens, [DEC] and prompt included
    "repetition_penalty": 1.0,  # beam search / greedy (official 1.0)
    "sample": False,  # nucleus sampling instead of beam search
    "top_p": 0.9,  # nucleus sampling mass (official 0.9)
    "top_k": 50,  # sampling keeps the k likeliest tokens first (transformers default, so also the official code)
    "sample_repetition_penalty": 1.1,  # repetition penalty when sampling (hard-coded 1.1 in the official code)
    "coco_gt_root": "annotation/coco_gt",  # dataset coco: coco_karpathy_{val,test}_gt.json (downloaded if missing)
    # Parameter-efficient fine-tuning (models/peft_methods.py, models/context_adapter.py). A partial mapping in a
    # YAML file or `--options finetune.method=lora` is merged over these defaults.
    "finetune": {
        "method": "full",  # full (official) | lora | prompt | adapter (ContextBLIP multi-scale adapter + TMIM)
        "base": "",  # evaluating/resuming a delta checkpoint: base weights; '' = the source recorded in it
        "extra_trainable": [],  # parameter-name prefixes that also train, e.g. [itm_head, vision_proj, text_proj]
        "lora": {
            "rank": 8,
            "alpha": 16.0,  # LoRA scale = alpha / rank
            "dropout": 0.0,
            # module-name suffixes (peft matching); the momentum encoders get the same adapters (EMA copies)
            "target_modules": [
                "attn.qkv",
                "attn.proj",
                "attention.self.query",
                "attention.self.value",
                "crossattention.self.query",
                "crossattention.self.value",
            ],
        },
        # learnable tokens: text ones inserted after [CLS]/[ENC]; vision ones after the ViT's class token (VPT)
        "prompt": {"text_tokens": 8, "vision_tokens": 0},
        "adapter": {
            "layers": [3, 6, 9, 12],  # 1-based ViT blocks read by the down-projections (DPAL)
            "reduction": 2,  # downsampling rate delta: each DPAL maps width -> width / delta
            "gate": False,  # true: the UPAL output is scaled by a learned scalar that starts at 0 (not ContextBLIP)
            "itc_weight": 0.0,  # ContextBLIP trains ITM + TMIM only; > 0 adds the ITC loss
            "tmim_weight": 1.0,  # weight of the text-guided masked image modelling loss; 0 = ITM only
            "mask_ratio": 0.25,  # pi: share of patches masked, those with the highest text cross-attention
            "decoder_width": 384,  # ContextBLIP's released code: 768 (configs/imagecode_contextblip.yaml)
            "decoder_depth": 4,
            "decoder_heads": 8,
            # blip: BLIP's hard negatives (softmax of the adapted ITC similarities / temp, same image masked) |
            # contextblip: the released code's (softmax of the frozen pre-adapter cosines, no temp, + 1e-4, only
            # the diagonal masked: nearly uniform)
            "itm_negatives": "blip",
            # detached: TMIM's decoder reads the positive pair's text states detached | contextblip: the released
            # code's trainable text adapter on them, not detached (TMIM's gradient reaches the adapter via ITM)
            "tmim_text": "detached",
        },
    },
    # Composed image retrieval on CIRR (train_cirr.py; CoVR's BLIP recipe; README "Composed image retrieval").
    "cirr_ann_root": "",  # folder with captions/cap.rc2.{train,val,test1}.json and image_splits/split.rc2.*.json
    "cirr_image_root": "",  # folder the split files' ./train/.., ./dev/.., ./test1/.. image paths start from
    "cir_query": "multimodal",  # multimodal ([ENC] text over the reference image, CoVR) | text | image (baselines)
    "cir_temp": 0.07,  # fixed HN-NCE temperature (CoVR)
    "cir_hnnce_alpha": 1.0,  # HN-NCE weight of the positive term (CoVR: 1)
    "cir_hnnce_beta": 0.5,  # HN-NCE concentration on hard negatives (CoVR: 0.5; 0 with alpha 1 = InfoNCE)
    "cir_train_vit": False,  # train the ViT too (CoVR freezes it; vision_proj always stays frozen)
    "cir_sampler": "random",  # training batches: random (CoVR) | contrastive (no two pairs of one subset) | similar
    "cir_train_transform": "train",  # reference-image transform in training: train (BLIP's, per train_augment) | test
    # IMAGECODE-style evaluation (eval_imagecode.py; engine/imagecode.py). --scoring / --text-cleaning override them.
    "imagecode_scoring": "both",  # both (ITM logit + cosine) | itm | itc | itm_prob (softmax P(match), ContextBLIP)
    "imagecode_text_cleaning": "blip",  # blip (pre_caption) | albef (ContextBLIP's zero-shot script: ALBEF's rule)
    # HN-NCE as written: paper (Radenovic et al. 2023 eq. 3, the loss CoVR's paper names) | covr_code (CoVR's released
    # src/model/blip/loss.py, whose query->target weights divide by another row's sum; models.blip_cir.hn_nce_terms)
    "cir_hnnce_variant": "paper",
    # Positives of the val metrics: soft_subset (CoVR src/test/blip/cirr_val.py: Recall@K by target_hard, Recall_subset
    # by the best target_soft grade) | soft (CIRPLANT's validation: both by the best target_soft grade) | hard (both by
    # target_hard only, binary)
    "cirr_val_targets": "soft_subset",
    # The val gallery: split (the images of image_splits/split.rc2.val.json, as CIRR's own code ranks) | folder (every
    # .png of the folder holding them, img_raw/dev, as CoVR's validation ranks); test1 always uses its split file
    "cirr_val_gallery": "split",
    # BLIP-2 as the composed-retrieval backbone (models/blip2_cir.py): how the 32 query outputs become one vector.
    "cir_blip2_pooling": "mean",  # mean (the study's better one) | max over the queries, before the projection
}


# Which keys belong together. Every key of DEFAULT_CONFIG is in exactly one group (tests/test_utils.py checks it).
KEY_GROUPS: dict[str, tuple[str, ...]] = {
    # Runtime, optimisation, epochs and selection: the trainer's keys (engine/trainer.py), used by every script.
    "run": (
        "amp", "eval_amp", "amp_cpu", "device", "seed", "num_workers", "batch_size_train", "batch_size_test",
        "init_lr", "min_lr", "weight_decay", "max_epoch", "lr_schedule", "warmup_steps", "lr_decay_rate", "warmup_lr",
        "optimizer_betas", "optimizer_eps", "eval_every", "select_epoch", "grad_accum_steps", "clip_grad_norm",
        "log_every", "compile", "tensorboard",
    ),
    # The network (BLIP, or BLIP-2 / CLIP where a task takes them), its tokenizer, text cleaning and training
    # augmentation: every task.
    "model": (
        "model", "blip2_config", "blip2_freeze_vit", "pretrained", "vit", "vit_grad_ckpt", "vit_ckpt_layer",
        "image_size", "text_encoder", "med_config", "embed_dim", "max_words", "max_length", "vit_layer_norm_eps",
        "drop_path_rate", "train_augment", "min_scale", "autocontrast",
    ),
    # Flickr30K / COCO / custom image-caption files: retrieval and captioning.
    "data": ("image_root", "ann_root", "dataset", "train_file", "val_file", "test_file"),
    "retrieval": (
        "queue_size", "alpha", "momentum", "k_test", "negative_all_rank", "eval_mode", "itm_batch_size",
        "rerank_score", "itm_negatives", "itm_negatives_steps", "clip_model", "clip_pretrained_tag",
        "clip_context_length", "finetune",
    ),
    "search": ("search_feature_dtype", "search_chunk_images", "search_block_rows", "search_cache_images"),
    "imagecode": ("imagecode_scoring", "imagecode_text_cleaning"),
    "caption": (
        "prompt", "caption_max_tokens", "label_smoothing", "num_beams", "gen_max_length", "gen_min_length",
        "repetition_penalty", "sample", "top_p", "top_k", "sample_repetition_penalty", "coco_gt_root",
    ),
    "cir": (
        "cirr_ann_root", "cirr_image_root", "cir_query", "cir_temp", "cir_hnnce_alpha", "cir_hnnce_beta",
        "cir_hnnce_variant", "cir_train_vit", "cir_sampler", "cir_train_transform", "cirr_val_targets",
        "cirr_val_gallery", "cir_blip2_pooling",
    ),
}  # fmt: skip
_RETRIEVAL_FAMILY = ("run", "model", "data", "retrieval", "search", "imagecode")
_CAPTION_FAMILY = ("run", "model", "data", "caption")
# The groups each script honours (its family's). Scripts not listed (bench/, studies/) accept every key.
SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("train_retrieval.py", "eval_retrieval.py", "search.py", "eval_imagecode.py", "export_merged.py"),
        _RETRIEVAL_FAMILY,
    ),
    **dict.fromkeys(("train_caption.py", "caption.py"), _CAPTION_FAMILY),
    "train_cirr.py": ("run", "model", "cir"),
}
_GROUP_OF = {key: group for group, keys in KEY_GROUPS.items() for key in keys}


def check_script_keys(config: dict, origins: dict[str, str], script: str) -> None:
    """Refuse any key the user set (`origins`: key -> where it was set) to a non-default value that `script` does not
    honour. A key at its default changes nothing in any script, so a resolved config.yaml, which lists every key,
    loads in every script of its family."""
    allowed = SCRIPT_GROUPS[script]
    for key, origin in origins.items():
        group = _GROUP_OF.get(key)
        if group is not None and group not in allowed and config[key] != DEFAULT_CONFIG[key]:
            users = sorted(s for s, groups in SCRIPT_GROUPS.items() if group in groups)
            raise ConfigError(
                f"config key {key!r} ({origin}) is not used by {script}: it is a {group} key, read by "
                f"{', '.join(users)}; remove it from this config or run one of those scripts"
            )


# Accepted types per key; by default the type of the default value (int is accepted for float below).
_TYPES: dict[str, tuple[type, ...]] = {k: (type(v),) for k, v in DEFAULT_CONFIG.items() if v is not None}
_TYPES.update(
    vit=(str, dict),
    med_config=(str, dict),
    drop_path_rate=(float, type(None)),
    vit_ckpt_layer=(int, str),
    blip2_config=(str, dict),
    **dict.fromkeys(("train_file", "val_file", "test_file"), (str, type(None))),
)
# The accepted values of each string-valued key; the modules that act on a key take its tuple from here.
CONFIG_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("flickr", "coco", "custom"),
    "amp": ("bf16", "fp16", "none"),
    "eval_amp": ("bf16", "fp16", "none"),
    "itm_negatives": ("hard", "uniform", "warmup", "anneal"),
    "rerank_score": ("official", "calibrated"),
    "device": ("auto", "cuda", "cpu"),
    "eval_mode": ("fast", "official"),
    "autocontrast": ("official", "fixed"),
    "train_augment": ("official", "crop", "none"),
    "vit": ("base", "large"),
    "vit_ckpt_layer": ("auto",),
    "search_feature_dtype": ("float16", "float32"),
    "model": ("blip", "clip", "blip2"),
    "cir_query": ("multimodal", "text", "image"),
    "cir_sampler": ("random", "contrastive", "similar"),
    "cir_train_transform": ("train", "test"),
    "lr_schedule": ("cosine_epoch", "cosine_step", "step_decay"),
    "select_epoch": ("best", "last"),
    "imagecode_scoring": ("both", "itm", "itc", "itm_prob"),
    "imagecode_text_cleaning": ("blip", "albef"),
    "cir_hnnce_variant": ("paper", "covr_code"),
    "cirr_val_targets": ("soft_subset", "soft", "hard"),
    "cirr_val_gallery": ("split", "folder"),
    "cir_blip2_pooling": ("mean", "max"),
}
# Inclusive (low, high) bounds; None = unbounded.
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    **{
        k: (1, None)
        for k in (
            "batch_size_train",
            "batch_size_test",
            "image_size",
            "queue_size",
            "k_test",
            "embed_dim",
            "max_words",
            "max_length",
            "itm_batch_size",
            "eval_every",
            "grad_accum_steps",
            "log_every",
            "search_chunk_images",
            "search_block_rows",
        )
    },
    **{
        k: (0, None)
        for k in (
            "max_epoch",
            "num_workers",
            "vit_ckpt_layer",
            "init_lr",
            "min_lr",
            "itm_negatives_steps",
            "warmup_steps",
            "warmup_lr",
            "optimizer_eps",
            "weight_decay",
            "clip_grad_norm",
            "search_cache_images",
        )
    },
    **{k: (0, 1) for k in ("alpha", "momentum", "drop_path_rate")},
    "min_scale": (1e-3, 1),
    "lr_decay_rate": (1e-6, 1),
    "clip_context_length": (1, None),
    # Captioning.
    **{k: (1, None) for k in ("caption_max_tokens", "num_beams", "gen_max_length", "top_k")},
    "gen_min_length": (0, None),
    **{k: (0, 1) for k in ("label_smoothing", "top_p")},
    **{k: (1e-6, None) for k in ("repetition_penalty", "sample_repetition_penalty")},
    "cir_temp": (1e-4, None),
    **{k: (0, None) for k in ("cir_hnnce_alpha", "cir_hnnce_beta")},
}
_VIT_KEYS: dict[str, tuple[type, ...]] = {
    "width": (int,),
    "depth": (int,),
    "heads": (int,),
    "patch_size": (int,),
    "mlp_ratio": (int, float),
}
_VIT_REQUIRED = ("width", "depth", "heads")
# PyYAML follows YAML 1.1, where '1e-5' (no dot, unsigned exponent) is a string, not a float.
_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _suggest(key: str, choices: Any) -> str:
    match = difflib.get_close_matches(key, list(choices), n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(choices))}"


def _fix_numeric(value: Any, types: tuple[type, ...]) -> Any:
    """Turn a numeric-looking string into a float unless the key takes strings."""
    if isinstance(value, str) and str not in types and _NUMERIC.fullmatch(value.strip()):
        return float(value)
    return value


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an int",
        float: "a number",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(names[t] for t in types)


def _check_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool subclasses int; only accept it where bool is meant
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _check_vit(vit: dict, where: str) -> None:
    for sub, value in vit.items():
        if sub not in _VIT_KEYS:
            raise ConfigError(f"unknown config key 'vit.{sub}' {where}{_suggest(str(sub), _VIT_KEYS)}")
        if not _check_type(value, _VIT_KEYS[sub]) or value <= 0:
            raise ConfigError(
                f"config key 'vit.{sub}' {where}: expected a positive "
                f"{'number' if float in _VIT_KEYS[sub] else 'int'}, got {value!r}"
            )
    missing = [k for k in _VIT_REQUIRED if k not in vit]
    if missing:
        raise ConfigError(
            f"config key 'vit' {where}: a vit mapping needs {', '.join(_VIT_REQUIRED)}; missing {', '.join(missing)}"
        )
    if vit["width"] % vit["heads"]:
        raise ConfigError(f"config key 'vit' {where}: width {vit['width']} is not divisible by heads {vit['heads']}")


FINETUNE_METHODS = ("full", "lora", "prompt", "adapter")
# Inclusive bounds of the numeric finetune sub-keys (dotted names).
_FINETUNE_BOUNDS: dict[str, tuple[float, float | None]] = {
    "lora.rank": (1, None),
    "lora.alpha": (0, None),
    "lora.dropout": (0, 0.99),
    "prompt.text_tokens": (0, None),
    "prompt.vision_tokens": (0, None),
    "adapter.reduction": (1, None),
    "adapter.itc_weight": (0, None),
    "adapter.tmim_weight": (0, None),
    "adapter.mask_ratio": (0.01, 0.99),
    "adapter.decoder_width": (1, None),
    "adapter.decoder_depth": (1, None),
    "adapter.decoder_heads": (1, None),
}
# The accepted values of the string finetune sub-keys (dotted names).
FINETUNE_CHOICES: dict[str, tuple[str, ...]] = {
    "adapter.itm_negatives": ("blip", "contextblip"),
    "adapter.tmim_text": ("detached", "contextblip"),
}


def _merge_checked(value: Any, default: Any, name: str, where: str) -> Any:
    """`value` merged over `default` (mappings recursively), with the type of every leaf checked against the
    default's: unknown sub-keys and wrong types are ConfigErrors naming the dotted key."""
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} {where}: expected a mapping, got {type(value).__name__} {value!r}")
        merged = copy.deepcopy(default)
        for sub, sub_value in value.items():
            if sub not in default:
                raise ConfigError(f"unknown config key '{name}.{sub}' {where}{_suggest(str(sub), default)}")
            merged[sub] = _merge_checked(sub_value, default[sub], f"{name}.{sub}", where)
        return merged
    if isinstance(default, list):
        if not isinstance(value, list) or any(isinstance(v, (dict, list)) for v in value):
            raise ConfigError(f"config key {name!r} {where}: expected a list of values, got {value!r}")
        return list(value)
    types = (float,) if isinstance(default, float) else (type(default),)
    value = _fix_numeric(value, types)
    if not _check_type(value, types):
        raise ConfigError(
            f"config key {name!r} {where}: expected {_type_name(types)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if isinstance(default, float) else value


def check_finetune(finetune: Any, where: str) -> dict:
    """The `finetune` mapping merged over its defaults and checked (method, sub-keys, types, bounds, layers)."""
    merged = _merge_checked(finetune, DEFAULT_CONFIG["finetune"], "finetune", where)
    if merged["method"] not in FINETUNE_METHODS:
        raise ConfigError(
            f"config key 'finetune.method' {where}: expected one of {', '.join(FINETUNE_METHODS)}, "
            f"got {merged['method']!r}"
        )
    for dotted, (lo, hi) in _FINETUNE_BOUNDS.items():
        group, sub = dotted.split(".")
        value = merged[group][sub]
        if value < lo or (hi is not None and value > hi):
            expected = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"config key 'finetune.{dotted}' {where}: expected a value {expected}, got {value!r}")
    for dotted, choices in FINETUNE_CHOICES.items():
        group, sub = dotted.split(".")
        if merged[group][sub] not in choices:
            raise ConfigError(
                f"config key 'finetune.{dotted}' {where}: expected one of {', '.join(choices)}, "
                f"got {merged[group][sub]!r}"
            )
    if merged["method"] == "prompt" and merged["prompt"]["text_tokens"] + merged["prompt"]["vision_tokens"] < 1:
        raise ConfigError(
            f"config keys 'finetune.prompt.text_tokens' and 'finetune.prompt.vision_tokens' {where}: both are 0; "
            "prompt tuning needs at least one prompt token"
        )
    layers = merged["adapter"]["layers"]
    if not layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in layers):
        raise ConfigError(
            f"config key 'finetune.adapter.layers' {where}: expected a non-empty list of 1-based ViT block "
            f"numbers (e.g. [3, 6, 9, 12]), got {layers!r}"
        )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"config key 'finetune.adapter.layers' {where}: repeated block in {layers!r}")
    for key in ("target_modules",):
        names = merged["lora"][key]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"config key 'finetune.lora.{key}' {where}: expected a non-empty list of module-name suffixes "
                f"(e.g. [attn.qkv, attention.self.query]), got {names!r}"
            )
    if not all(isinstance(n, str) and n for n in merged["extra_trainable"]):
        raise ConfigError(
            f"config key 'finetune.extra_trainable' {where}: expected a list of parameter-name prefixes, "
            f"got {merged['extra_trainable']!r}"
        )
    return merged


def validate_config(config: dict, origins: dict[str, str] | str | None = None) -> dict:
    """Check keys, types, enums and ranges; return the config with float keys normalised to float.

    `origins` names where each key came from (a file or an override) for the error messages.
    """

    def where(key: str) -> str:
        src = origins.get(key) if isinstance(origins, dict) else origins
        return f"in {src}" if src else "in config"

    for key in config:
        if key not in DEFAULT_CONFIG:
            raise ConfigError(f"unknown config key {key!r} {where(key)}{_suggest(str(key), DEFAULT_CONFIG)}")
    for key, value in config.items():
        types = _TYPES[key]
        if not _check_type(value, types):
            # YAML 1.1 reads yes/no/on/off as booleans, a common surprise for enum values like amp.
            hint = "; quote the value" if isinstance(value, bool) and str in types else ""
            raise ConfigError(
                f"config key {key!r} {where(key)}: expected {_type_name(types)}, "
                f"got {type(value).__name__} {value!r}{hint}"
            )
        if float in types and isinstance(value, int):
            config[key] = value = float(value)
        if key in CONFIG_CHOICES and isinstance(value, str) and value not in CONFIG_CHOICES[key]:
            raise ConfigError(
                f"config key {key!r} {where(key)}: expected one of {', '.join(CONFIG_CHOICES[key])}, got {value!r}"
            )
        lo, hi = _BOUNDS.get(key, (None, None))
        if isinstance(value, (int, float)) and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            expected = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"config key {key!r} {where(key)}: expected a value {expected}, got {value!r}")
    if isinstance(config["vit"], dict):
        _check_vit(config["vit"], where("vit"))
    patch = config["vit"].get("patch_size", 16) if isinstance(config["vit"], dict) else 16
    if config["model"] == "blip" and config["image_size"] % patch:  # BLIP-2 checks its own patch (models/blip2.py)
        raise ConfigError(
            f"config key 'image_size' {where('image_size')}: {config['image_size']} is not "
            f"divisible by the ViT patch size {patch}"
        )
    for amp_key in ("amp", "eval_amp"):  # amp none simply turns autocast off everywhere
        if config["amp_cpu"] and config[amp_key] == "fp16":
            raise ConfigError(
                f"config key 'amp_cpu' {where('amp_cpu')}: CPU autocast is bf16 only, but {amp_key} "
                f"is {config[amp_key]!r}; set {amp_key}: bf16 or amp_cpu: false"
            )
    config["finetune"] = check_finetune(config["finetune"], where("finetune"))
    if config["model"] in ("clip", "blip2") and config["finetune"]["method"] != "full":
        # The methods hook into BLIP's modules (ViT blocks, MED attention, the momentum towers).
        raise ConfigError(
            f"config key 'finetune.method' {where('finetune')}: {config['finetune']['method']!r} is built for BLIP "
            f"models; with model: {config['model']} use finetune.method: full"
        )
    if config["itm_negatives"] in ("warmup", "anneal") and config["itm_negatives_steps"] <= 0:
        raise ConfigError(
            f"config key 'itm_negatives_steps' {where('itm_negatives_steps')}: itm_negatives "
            f"{config['itm_negatives']!r} needs a number of optimizer steps > 0, got "
            f"{config['itm_negatives_steps']!r}"
        )
    betas = config["optimizer_betas"]
    if len(betas) != 2 or not all(_check_type(b, (float,)) and 0 <= b < 1 for b in betas):
        raise ConfigError(
            f"config key 'optimizer_betas' {where('optimizer_betas')}: expected two numbers in [0, 1) "
            f"(e.g. [0.9, 0.999]), got {betas!r}"
        )
    config["optimizer_betas"] = [float(b) for b in betas]
    if config["gen_min_length"] > config["gen_max_length"]:
        raise ConfigError(
            f"config key 'gen_min_length' {where('gen_min_length')}: {config['gen_min_length']} is more than "
            f"gen_max_length {config['gen_max_length']}"
        )
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings (dotted keys allowed) into {key: YAML-parsed value}, in order."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. init_lr=5e-6, vit.depth=2)")
        try:
            parsed[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return parsed


def _apply_override(config: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"override {key!r}: config key {prefix!r} is {node!r}, not a mapping, so it "
                f"has no sub-key {parts[depth + 1]!r}; set {prefix} to a mapping first"
            )
    # Nested values are always numbers or mappings here (vit.*), so any numeric string is meant as one.
    types = _TYPES.get(key, (float,)) if len(parts) == 1 else (float,)
    node[parts[-1]] = _fix_numeric(value, types)


def load_config(path: str, overrides: list[str] | None = None, script: str | None = None) -> dict:
    """Load a YAML config, merge it over DEFAULT_CONFIG, apply `key=value` overrides and validate. With `script`
    (a name in SCRIPT_GROUPS), a key set in the file or the overrides that the script does not use is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except IsADirectoryError as err:
        raise ConfigError(f"config file {path} is a folder; expected a YAML file") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if loaded is None:  # an empty file means "all defaults"
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(loaded).__name__}")
    config = copy.deepcopy(DEFAULT_CONFIG)
    origins = dict.fromkeys(config, "defaults")
    for key, value in loaded.items():
        config[key] = _fix_numeric(value, _TYPES.get(key, (str,)))
        origins[key] = path
    for item in overrides or []:
        ((key, value),) = parse_overrides([item]).items()
        _apply_override(config, key, value)
        origins[key.split(".")[0]] = f"override {item!r}"
    config = validate_config(config, origins)  # unknown keys first: they get the nearest valid name
    if script is not None:
        check_script_keys(config, {k: f"in {v}" for k, v in origins.items() if v != "defaults"}, script)
    return config


def save_config(config: dict, path: str) -> None:
    """Write the config as YAML (keys in their order), atomically."""
    atomic_write(path, lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))

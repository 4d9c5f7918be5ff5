"""BLIP-2 training (models/blip2.py forward, models/blip2_cir.py): LAVIS's retrieval fine-tuning losses against an
independent computation, an optimizer step, exact resume and two processes through the shared trainer; composed
retrieval with both poolings, its evaluation against a one-by-one computation, and its checkpoints."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers

import train_cirr
import train_retrieval
from configs.schema import DEFAULT_CONFIG, save_config, validate_config
from data import create_dataset
from data.cirr import load_cirr_split
from data.cirr_synthetic import config_keys as cirr_config_keys
from data.cirr_synthetic import make_cirr_dataset
from data.synthetic import config_keys, make_synthetic_dataset
from engine import trainer
from engine.cir import evaluate_cirr
from models.blip2_cir import Blip2Cir, load_blip2_cir_model, pool_queries
from models.loading import load_model
from tests.dist_helpers import run_distributed
from tests.helpers import for_script
from tests.test_blip2 import TINY_BLIP2
from tests.test_cirr import _independent_metrics
from utils import ConfigError

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "Blip2ForImageTextRetrieval"),
    reason="this transformers has no Blip2ForImageTextRetrieval (model: blip2 refuses it with a ConfigError)",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Retrieval data (12 train images x 2 captions, 4 val, 4 test, 32 px) and CIRR data over its vocabulary."""
    root = tmp_path_factory.mktemp("blip2_train")
    paths = make_synthetic_dataset(
        str(root / "ret"), num_train_images=12, num_val_images=4, num_test_images=4, captions_per_image=2,
        image_size=32, seed=0,
    )  # fmt: skip
    cirr = make_cirr_dataset(
        str(root / "cirr"),
        {"train": 4, "val": 2, "test1": 2},
        image_size=32,
        seed=3,
        extra_vocab=open(paths["vocab_file"]).read().split(),
    )
    return {"paths": paths, "cirr": cirr, "root": str(root)}


def _config(data: dict, **overrides) -> dict:
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(config_keys(data["paths"]))
    config.update(
        model="blip2", blip2_config=copy.deepcopy(TINY_BLIP2), image_size=32, device="cpu", num_workers=0,
        batch_size_train=8, batch_size_test=8, k_test=3, max_words=50, init_lr=1e-3, max_epoch=2, log_every=1,
        train_augment="none", amp="none",
    )  # fmt: skip
    config.update(overrides)
    return validate_config(config, "test_blip2_train")


def _batch(config: dict, n: int = 8) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    dataset = create_dataset(config, "train")
    items = [dataset[i] for i in range(n)]
    return torch.stack([i[0] for i in items]), [i[1] for i in items], torch.tensor([i[2] for i in items])


# ----------------------------------------------------------------------------------------------------
# Retrieval fine-tuning
# ----------------------------------------------------------------------------------------------------


def test_itc_loss_equals_an_independent_computation(data):
    """LAVIS's ITC with image ids, written out per pair: sim = max over queries of the cosine / temp; the targets of
    a row are 0.9 x (1 / #positives on its positives) + 0.1 / N."""
    config = _config(data)
    torch.manual_seed(0)
    model, _ = load_model(config)
    model.eval()  # no dropout: the two computations see the same features
    images, captions, idx = _batch(config)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(images, captions, 0.0, idx)
        _, query_feat = model.encode_image(images)
        text_feat = model.encode_text(*model.tokenize(captions))
    n = len(captions)
    expected = 0.0
    for direction in ("i2t", "t2i"):
        for row in range(n):
            sims = torch.tensor(
                [
                    max(float(q @ text_feat[col if direction == "i2t" else row]) for q in
                        query_feat[row if direction == "i2t" else col]) / float(model.temp)
                    for col in range(n)
                ]
            )  # fmt: skip
            positives = [int(idx[col] == idx[row]) for col in range(n)]
            targets = torch.tensor([0.9 * p / sum(positives) + 0.1 / n for p in positives])
            expected += float(-(torch.log_softmax(sims, dim=0) * targets).sum()) / n / 2
    assert float(out["loss_ita"]) == pytest.approx(expected, rel=1e-5)
    assert out["loss"] == pytest.approx(float(out["loss_ita"] + out["loss_itm"]))
    assert set(out) == {"loss", "loss_ita", "loss_itm", "loss_tmim", "itm_acc_pos", "itm_acc_neg", "num_neg_fallback"}


def test_an_optimizer_step_trains_the_qformer_with_finite_losses(data):
    config = _config(data)
    model, _ = load_model(config)
    model.train()
    groups = model.optimizer_groups(0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(*_batch(config)[:2], 0.4, _batch(config)[2])
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("net.qformer.encoder.layer.0.crossattention") for k in changed)
    assert {"net.query_tokens", "net.text_projection.weight", "net.itm_head.weight", "temp"} <= changed
    assert not any(k.startswith("net.vision_model.") for k in changed)  # blip2_freeze_vit true
    # LAVIS's weight-decay rule: 1-D tensors and biases without, the rest (the 0-d temperature too) with.
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith(".bias") or "layernorm" in names[i].lower() for i in no_decay)
    assert id(model.temp) not in no_decay


def _retrieval_config_path(data: dict, tmp_path) -> str:
    path = str(tmp_path / "blip2_train.yaml")
    save_config(_config(data), path)
    return path


class _Interrupted(Exception):
    pass


def test_resume_equals_a_straight_run_bitwise(data, tmp_path, monkeypatch):
    """train_retrieval.py with model: blip2: 1 epoch, a crash, --resume equals 2 epochs in one go (CPU fp32)."""
    config_path = _retrieval_config_path(data, tmp_path)
    straight = train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path / "straight")])
    save = trainer.save_last_checkpoint

    def save_then_crash(state: dict, path: str) -> None:
        save(state, path)
        raise _Interrupted

    monkeypatch.setattr(trainer, "save_last_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(trainer, "save_last_checkpoint", save)
    train_retrieval.main(["--config", config_path, "--output-dir", str(tmp_path / "resumed"), "--resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["train_state"]["global_step"] == b["train_state"]["global_step"] == 6
    steps = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl") if '"loss_ita"' in line]
    assert steps and all(0 < r["loss_ita"] < 100 and 0 < r["loss_itm"] < 100 for r in steps)
    assert "r_mean" in straight["best_test"] and straight["model"].identity["model"] == "blip2"


def _dist_forward(rank: int, world_size: int, config: dict, batch: tuple) -> float:
    torch.manual_seed(0)
    model, _ = load_model(config)
    model.eval()
    images, captions, idx = batch
    per_rank = len(captions) // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    with torch.no_grad():
        return float(model(images[part], captions[part], 0.0, idx[part])["loss_ita"])


def test_two_processes_agree_with_one_on_the_itc_loss(data):
    """Features gathered from both ranks: the mean of the ranks' ITC losses is the one-process loss over the same
    global batch (the ITM loss differs by its random negatives)."""
    config = _config(data)
    batch = _batch(config)
    single = _dist_forward(0, 1, config, batch)
    ranks = run_distributed(_dist_forward, 2, config, batch, timeout_s=180)
    assert sum(ranks) / 2 == pytest.approx(single, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Composed retrieval
# ----------------------------------------------------------------------------------------------------


def _cir_config(data: dict, **overrides) -> dict:
    base = {
        **cirr_config_keys(data["cirr"]),
        "text_encoder": data["paths"]["vocab_file"],
        "batch_size_train": 8,
        "batch_size_test": 7,
        "max_epoch": 1,
        "init_lr": 1e-3,
        "cir_train_transform": "test",
        "max_words": 30,  # tests.test_cirr._independent_metrics cuts captions at 30 words
    }
    return for_script(_config(data, **{**base, **overrides}), "train_cirr.py")


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_both_poolings_train(data, pooling):
    """A few steps on one generated CIRR batch lower HN-NCE; only the query side moves."""
    config = _cir_config(data, cir_blip2_pooling=pooling)
    torch.manual_seed(0)
    model, _ = load_blip2_cir_model(config)
    split = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "train")
    from data import test_transform
    from data.retrieval import load_image

    transform = test_transform(config["image_size"])
    pairs = split.pairs[:8]
    refs = torch.stack([transform(load_image(split.image_path(p.reference))) for p in pairs])
    targets = torch.stack([transform(load_image(split.image_path(p.target))) for p in pairs])
    with torch.no_grad():
        target_feat = model.image_feat(model.image_tokens(targets))
    target_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("target_")}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        out = model(refs, [p.caption for p in pairs], target_feat, 1.0, 0.5)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for key, value in target_state.items():  # the target side is the frozen starting Q-Former
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(model.image_feat(model.image_tokens(targets)), target_feat)


def test_pooling_and_projection_of_the_query(data):
    """The query is the joint [queries; text] pass over the reference image (the ITM path), pooled, then text_proj;
    mean pooling before the projection equals the mean of the projected queries."""
    config = _cir_config(data)
    torch.manual_seed(0)
    retrieval, _ = load_model(config)
    retrieval.eval()  # no dropout in the reference computation
    model = Blip2Cir(copy.deepcopy(retrieval)).eval()
    hidden = torch.randn(3, 32, retrieval.net.text_projection.in_features)
    proj = retrieval.net.text_projection
    assert torch.allclose(proj(pool_queries(hidden, "mean")), proj(hidden).mean(dim=1), atol=1e-6)
    assert torch.equal(pool_queries(hidden, "max"), hidden.max(dim=1).values)
    images = torch.randn(2, 3, 32, 32)
    texts = ["make the red circle blue", "add a square"]
    with torch.no_grad():
        tokens = retrieval.image_tokens(images)
        ids, atts = model.tokenize(texts, torch.device("cpu"))
        queries = retrieval.net.query_tokens.expand(2, -1, -1)
        hidden = retrieval.net.qformer(
            query_embeds=retrieval.net.embeddings(input_ids=ids, query_embeds=queries),
            query_length=32,
            attention_mask=torch.cat([torch.ones(2, 32, dtype=atts.dtype), atts], dim=1),
            encoder_hidden_states=tokens,
        ).last_hidden_state[:, :32]
        expected = F.normalize(proj(hidden.mean(dim=1)), dim=-1)
        assert torch.allclose(model.query_feat(model.image_tokens(images), texts), expected, atol=1e-5)
        target = F.normalize(retrieval.net.vision_projection(
            retrieval.net.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state.mean(dim=1)
        ), dim=-1)  # fmt: skip
        assert torch.allclose(model.image_feat(tokens), target, atol=1e-5)
    with pytest.raises(ConfigError, match="pooling"):
        load_blip2_cir_model(_cir_config(data, cir_blip2_pooling="mean") | {"cir_blip2_pooling": "sum"})


def test_train_cirr_end_to_end_evaluation_is_exact(data, tmp_path):
    """train_cirr.py with model: blip2 trains from a BLIP-2 retrieval checkpoint, its batched evaluation equals a
    one-by-one computation, --resume continues, and --evaluate of checkpoint_best reproduces the val figures."""
    torch.manual_seed(0)
    retrieval, _ = load_model(_config(data))
    source = str(tmp_path / "blip2_retrieval.pth")
    torch.save({"model": retrieval.state_dict()}, source)
    config = _cir_config(data, pretrained=source, max_epoch=2)
    cfg_path = str(tmp_path / "cirr_blip2.yaml")
    save_config(config, cfg_path)
    out = str(tmp_path / "run")
    train_cirr.main(["--config", cfg_path, "--output-dir", out, "--options", "max_epoch=1"])
    result = train_cirr.main(["--config", cfg_path, "--output-dir", out, "--resume"])
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in records if "train_loss" in r] == [0, 1]
    model = result["model"]
    assert isinstance(model, Blip2Cir)
    val = load_cirr_split(config["cirr_ann_root"], config["cirr_image_root"], "val")
    got = evaluate_cirr(model, val, config, torch.device("cpu")).metrics
    expected = _independent_metrics(model, val, config["image_size"])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    metrics = json.load(open(os.path.join(out, "metrics_val.json")))
    ev = train_cirr.main(
        ["--config", cfg_path, "--output-dir", str(tmp_path / "ev"), "--evaluate", "--options"]
        + [f"pretrained={os.path.join(out, 'checkpoint_best.pth')}"]
    )
    assert ev["best_val"]["r_avg"] == pytest.approx(metrics["r_avg"], abs=1e-4)

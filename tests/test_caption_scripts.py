"""train_caption.py and caption.py end to end on generated data: outputs, exact resume, --evaluate, unreadable
images, bad input."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

import caption
import train_caption
from configs.schema import save_config
from data.captions import coco_image_id, load_coco_gt
from data.retrieval import DataError
from data.synthetic import make_synthetic_dataset
from engine import caption_metrics, captioning, trainer
from engine.generation import GenerationSettings
from tests.dist_helpers import run_distributed
from tests.helpers import for_script, synthetic_config
from utils import ConfigError, UserError


@pytest.fixture(scope="module", autouse=True)
def no_meteor():
    """METEOR starts a JVM per call (seconds); its scorer is tested in test_caption_metrics.py."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(captioning, "caption_metrics", functools.partial(caption_metrics.caption_metrics, meteor=False))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 train images x 2 captions (6 batches of 8), 8 val and 8 test images, 32 px; a caption config."""
    root = tmp_path_factory.mktemp("caption_data")
    paths = make_synthetic_dataset(
        str(root), num_train_images=24, num_val_images=8, num_test_images=8, captions_per_image=2, image_size=32, seed=0
    )
    config = synthetic_config(
        root,
        paths,
        batch_size_train=8,
        batch_size_test=4,
        max_epoch=2,
        eval_every=2,
        log_every=2,
        init_lr=1e-3,
        gen_max_length=12,
        num_beams=2,
    )
    path = os.path.join(root, "caption.yaml")
    save_config(for_script(config, "train_caption.py"), path)
    return {"config": path, "root": str(root), "images": os.path.join(str(root), "images", "test")}


def _train(data: dict, out_dir, *extra: str) -> dict:
    return train_caption.main(["--config", data["config"], "--output-dir", str(out_dir), *extra])


@pytest.fixture(scope="module")
def straight(data: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("straight")
    _train(data, out)
    return str(out)


def test_outputs(straight: str) -> None:
    for name in ("config.yaml", "log.jsonl", "checkpoint_last.pth", "checkpoint_best.pth"):
        assert os.path.isfile(os.path.join(straight, name)), name
    metrics = json.load(open(os.path.join(straight, "caption_metrics_test.json")))
    assert metrics["epoch"] == 1 and metrics["num_images"] == 8
    assert all(metrics[k] is not None for k in ("bleu_1", "bleu_4", "rouge_l", "cider"))
    results = json.load(open(os.path.join(straight, "captions_test.json")))
    assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}
    assert results[0]["image_id"] == "test/00000.png" and isinstance(results[0]["caption"], str)
    records = [json.loads(line) for line in open(os.path.join(straight, "log.jsonl"))]
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[1]["train_loss"] < epochs[0]["train_loss"]


def test_resume_equals_straight_run(data: dict, straight: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 0 of the 2-epoch schedule, stopped there (as if killed), then --resume: the same weights as the
    straight run, bit for bit (one process, fp32, num_workers 0)."""
    save = trainer.save_last_checkpoint

    def save_then_crash(contents: dict, path: str) -> None:  # the job dies right after epoch 0 is saved
        save(contents, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_last_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path)
    monkeypatch.setattr(trainer, "save_last_checkpoint", save)
    _train(data, tmp_path, "--resume")
    a = torch.load(os.path.join(straight, "checkpoint_last.pth"), weights_only=True)
    b = torch.load(os.path.join(tmp_path, "checkpoint_last.pth"), weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for split in ("best_val", "best_test"):  # the same captions and scores (the timing differs)
        for key in caption_metrics.METRIC_KEYS:
            assert a["train_state"][split][key] == b["train_state"][split][key], (split, key)
    assert a["train_state"]["best_epoch"] == b["train_state"]["best_epoch"] == 1


def test_resume_and_fresh_run_checks(data: dict, straight: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match="already holds a training run"):
        _train(data, straight)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        _train(data, tmp_path, "--resume")
    with pytest.raises(ConfigError, match="auto is measured by train_retrieval"):
        _train(data, tmp_path, "--options", "vit_grad_ckpt=true", "vit_ckpt_layer=auto")


def test_evaluate_reproduces_the_selected_epoch(data: dict, straight: str, tmp_path) -> None:
    best = os.path.join(straight, "checkpoint_best.pth")
    out = _train(data, tmp_path, "--evaluate", "--options", f"pretrained={best}")
    saved = json.load(open(os.path.join(straight, "caption_metrics_test.json")))
    assert out["best_test"]["cider"] == pytest.approx(saved["cider"])
    assert out["best_test"]["bleu_4"] == pytest.approx(saved["bleu_4"])


def test_caption_cli_skips_unreadable_images(data: dict, straight: str, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("00000.png", "00001.png"):
        (folder / name).write_bytes(open(os.path.join(data["images"], name), "rb").read())
    (folder / "sub" / "00002.png").write_bytes(open(os.path.join(data["images"], "00002.png"), "rb").read())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "captions.json"
    ckpt = os.path.join(straight, "checkpoint_best.pth")
    args = ["--config", data["config"], "--checkpoint", ckpt, "--images", str(folder), "--output", str(out)]
    with pytest.raises(UserError, match=r"1 of 4 images could not be read[\s\S]*broken\.jpg"):
        caption.main(args + ["--num-beams", "3"])
    results = json.load(open(out))
    assert [r["image"] for r in results] == ["00000.png", "00001.png", "sub/00002.png"]
    assert all(isinstance(r["caption"], str) for r in results)
    assert "skipped broken.jpg" in capsys.readouterr().err
    # Greedy and seeded sampling run through the same path; sampling is reproducible with its seed.
    greedy = caption.main(args[:-4] + ["--images", os.path.join(data["images"], "00000.png"), "--output", str(out)])
    assert len(greedy) == 1
    sample_args = args[:-4] + ["--images", data["images"], "--output", str(out), "--sample", "--seed", "3"]
    assert caption.main(sample_args) == caption.main(sample_args)


def test_caption_cli_bad_inputs(data: dict, tmp_path) -> None:
    base = ["--config", data["config"], "--output", str(tmp_path / "c.json")]
    with pytest.raises(DataError, match="does not exist"):
        caption.main(base + ["--images", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        caption.main(base + ["--images", str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="gen_min_length"):
        caption.main(base + ["--images", data["images"], "--min-length", "30", "--max-length", "10"])


def test_coco_ids_and_ground_truth(tmp_path) -> None:
    assert coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    with pytest.raises(DataError, match="COCO image id"):
        coco_image_id("flickr30k-images/1000092795.jpg")
    gt = tmp_path / "coco_karpathy_test_gt.json"
    gt.write_text(
        json.dumps({"annotations": [{"image_id": 1, "caption": "a", "id": 1}, {"image_id": 1, "caption": "b"}]})
    )
    assert load_coco_gt(str(gt)) == {1: ["a", "b"]}
    gt.write_text(json.dumps([{"image": "x.jpg", "caption": ["a"]}]))
    with pytest.raises(DataError, match="not a COCO caption file"):
        load_coco_gt(str(gt))


def _dist_body(rank: int, world_size: int, config_path: str, out_dir: str) -> dict:
    # RANK/WORLD_SIZE/MASTER_* are set by run_distributed, so init_distributed joins a gloo group itself.
    result = train_caption.main(["--config", config_path, "--output-dir", out_dir, "--options", "max_epoch=1"])
    return {k: v.detach().clone() for k, v in result["model"].state_dict().items()}


def test_two_process_training_and_sharded_captioning(data: dict, tmp_path) -> None:
    """DDP keeps the ranks' weights identical, and the captions of the sharded evaluation are those of a
    single-process evaluation of the same weights, each image once and in order."""
    out = str(tmp_path / "ddp")
    states = run_distributed(_dist_body, 2, data["config"], out, init_process_group=False, timeout_s=300)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    sharded = json.load(open(os.path.join(out, "captions_test.json")))
    single = tmp_path / "single"
    _train(data, single, "--evaluate", "--options", f"pretrained={os.path.join(out, 'checkpoint_best.pth')}")
    assert json.load(open(single / "captions_test.json")) == sharded
    assert [r["image_id"] for r in sharded] == [f"test/{i:05d}.png" for i in range(8)]


def test_capfilt_samples_by_default_and_beam_search_is_an_option(data: dict, tmp_path) -> None:
    """BLIP section 4.3: CapFilt's captioner uses nucleus sampling (p 0.9); plain captioning keeps beam search."""
    base = ["--config", data["config"], "--images", data["images"], "--output", str(tmp_path / "c.json")]
    capfilt = [*base, "--filter", "--filter-checkpoint", "retrieval.pth"]

    def settings(argv: list[str]) -> GenerationSettings:
        return GenerationSettings.from_config(caption.resolve_config(caption.parse_args(argv)))

    sampled = settings(capfilt)
    assert (sampled.sample, sampled.num_beams, sampled.top_p, sampled.repetition_penalty) == (True, 1, 0.9, 1.1)
    beam = settings([*capfilt, "--beam-search"])
    assert (beam.sample, beam.num_beams) == (False, 2)  # the config's num_beams
    plain = settings(base)
    assert (plain.sample, plain.num_beams) == (False, 2)
    for bad in ([*base, "--beam-search"], [*capfilt, "--beam-search", "--sample"]):
        with pytest.raises(SystemExit):
            caption.parse_args(bad)


def test_capfilt_writes_retrieval_training_records(data: dict, straight: str, tmp_path) -> None:
    from configs.schema import load_config
    from data.retrieval import RetrievalTrainDataset
    from models.blip_retrieval import build_model

    retrieval_ckpt = str(tmp_path / "retrieval.pth")
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(data["config"])).state_dict()}, retrieval_ckpt)
    images_root = os.path.dirname(data["images"])  # names relative to it: test/00000.png, ...
    existing = tmp_path / "existing.json"
    existing.write_text(json.dumps([{"image": "test/00001.png", "caption": "a red circle", "image_id": "x"}]))
    out = tmp_path / "filtered.json"
    args = ["--config", data["config"], "--checkpoint", os.path.join(straight, "checkpoint_best.pth")]
    args += ["--images", data["images"], "--image-root", images_root, "--output", str(out), "--filter"]
    args += ["--filter-checkpoint", retrieval_ckpt, "--existing", str(existing)]
    kept = caption.main(args + ["--threshold", "0"])
    assert len(kept) == 9 and sum(r["source"] == "existing" for r in kept) == 1
    assert kept[0]["image"] == kept[0]["image_id"] == "test/00000.png"
    RetrievalTrainDataset(str(out), images_root, None)  # train_retrieval.py reads it as `dataset: custom`
    # The threshold splits the pairs by their ITM probability.
    median = sorted(r["itm"] for r in kept)[4]
    strict = caption.main(args + ["--threshold", str(median)])
    assert 0 < len(strict) < 9 and all(r["itm"] > median for r in strict)
    with pytest.raises(UserError, match="no pair passed"):
        caption.main(args + ["--threshold", "0.9999"])
    existing.write_text(json.dumps([{"image": "elsewhere/1.png", "caption": "a red circle"}]))
    with pytest.raises(DataError, match="not among the captioned"):
        caption.main(args)

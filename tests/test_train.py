"""train_retrieval.py end to end on generated data: outputs, exact resume, 2-process DDP, clear errors."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

import eval_retrieval
import train_retrieval
import utils
from configs import schema
from configs.schema import save_config
from data.synthetic import make_synthetic_dataset
from engine import memory, retrieval_task, trainer
from engine.retrieval_task import is_retrieval_finetuned
from engine.trainer import TrainState
from models.blip_retrieval import build_model
from models.checkpoint import CheckpointError
from tests.dist_helpers import run_distributed
from tests.helpers import synthetic_config
from utils import ConfigError

RECALL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 train images x 2 captions (48 samples: 6 batches of 8), 8 val and 8 test images, 32 px."""
    root = tmp_path_factory.mktemp("train_data")
    paths = make_synthetic_dataset(
        str(root), num_train_images=24, num_val_images=8, num_test_images=8, captions_per_image=2, image_size=32, seed=0
    )
    config = synthetic_config(
        root,
        paths,
        batch_size_train=8,
        batch_size_test=8,
        k_test=4,
        queue_size=16,
        max_epoch=2,
        log_every=2,
        init_lr=1e-4,
    )
    path = os.path.join(root, "config.yaml")
    save_config(config, path)
    return path


def _train(config_path: str, out_dir, *extra: str) -> dict:
    return train_retrieval.main(["--config", config_path, "--output-dir", str(out_dir), *extra])


@pytest.fixture(scope="module")
def straight_run(config_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two epochs in one go; its output directory."""
    out = tmp_path_factory.mktemp("straight")
    _train(config_path, out)
    return str(out)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_training_writes_every_output(straight_run: str):
    for name in (
        "config.yaml",
        "log.jsonl",
        "checkpoint_last.pth",
        "checkpoint_best.pth",
        "metrics_val.json",
        "metrics_test.json",
    ):
        assert os.path.isfile(os.path.join(straight_run, name)), name
    records = _read_jsonl(os.path.join(straight_run, "log.jsonl"))
    steps = [r for r in records if "loss_ita" in r]
    epochs = [r for r in records if "train_loss_ita" in r]
    assert len(steps) == 6 and len(epochs) == 2  # 6 optimizer steps per epoch, logged every 2
    assert set(steps[0]) == {
        "epoch",
        "step",
        "loss_ita",
        "loss_itm",
        "loss_tmim",  # 0 unless finetune.method adapter trains TMIM
        "itm_acc_pos",
        "itm_acc_neg",
        "lr",
        "images_per_s",
        "num_neg_fallback",
        "itm_hard_fraction",
    }
    assert all(0 <= r[k] <= 1 for r in steps for k in ("itm_acc_pos", "itm_acc_neg"))
    assert all(r["itm_hard_fraction"] == 1.0 for r in steps)  # the official hard negatives by default
    assert all(0 <= r[f"train_{k}"] <= 1 for r in epochs for k in ("itm_acc_pos", "itm_acc_neg"))
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert epochs[0]["lr"] == pytest.approx(1e-4) and epochs[1]["lr"] == pytest.approx(5e-5)  # cosine per epoch
    assert all(f"val_{k}" in r for r in epochs for k in RECALL_KEYS)
    best = epochs[-1]["best_epoch"]
    assert best in (0, 1)
    # Test is scored with the selected weights only, in the epoch that selected them.
    # Test is scored exactly when val r_mean sets a new best (with those weights), never in other epochs.
    running_best = [max(r["val_r_mean"] for r in epochs[: i + 1]) for i in range(len(epochs))]
    new_best = [i == 0 or epochs[i]["val_r_mean"] > running_best[i - 1] for i in range(len(epochs))]
    assert ["test_r_mean" in r for r in epochs] == new_best
    assert new_best[best] and not any(new_best[best + 1 :])
    with open(os.path.join(straight_run, "metrics_val.json")) as f:
        val = json.load(f)
    with open(os.path.join(straight_run, "metrics_test.json")) as f:
        test = json.load(f)
    assert set(RECALL_KEYS) <= set(val) and set(RECALL_KEYS) <= set(test)
    assert val["epoch"] == test["epoch"] == best
    assert val["r_mean"] == pytest.approx(epochs[best]["val_r_mean"])
    assert test["r_mean"] == pytest.approx(epochs[best]["test_r_mean"])
    last = torch.load(os.path.join(straight_run, "checkpoint_last.pth"), weights_only=True)
    state = last["train_state"]
    assert state["epoch"] == 1 and state["global_step"] == 12 and state["best_epoch"] == best
    assert {"image_queue", "text_queue", "idx_queue", "ptr_queue", "visual_encoder_m.pos_embed"} <= set(last["model"])
    assert len(last["rng_states"]) == 1 and last["config"]["max_epoch"] == 2
    best_ckpt = torch.load(os.path.join(straight_run, "checkpoint_best.pth"), weights_only=True)
    assert best_ckpt["epoch"] == best and best_ckpt["val_metrics"]["r_mean"] == pytest.approx(val["r_mean"])


class _Interrupted(Exception):
    pass


def test_resume_is_bitwise_identical_to_a_straight_run(config_path, straight_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    save = trainer.save_last_checkpoint

    def save_then_crash(state: dict, path: str) -> None:  # the job dies right after epoch 0 is saved
        save(state, path)
        raise _Interrupted

    monkeypatch.setattr(trainer, "save_last_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        _train(config_path, out)
    monkeypatch.setattr(trainer, "save_last_checkpoint", save)
    _train(config_path, out, "--resume")

    a = torch.load(os.path.join(straight_run, "checkpoint_last.pth"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # every tensor, momentum encoders and queues included, with atol 0
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name
    a_state, b_state = a["train_state"], b["train_state"]
    assert a_state.keys() == b_state.keys() == set(TrainState().to_dict())  # the whole state is saved
    for key in ("epoch", "global_step", "best_epoch", "best_metric"):
        assert a_state[key] == b_state[key], key
    assert {k: a_state["best_test"][k] for k in RECALL_KEYS} == {k: b_state["best_test"][k] for k in RECALL_KEYS}
    records = _read_jsonl(os.path.join(out, "log.jsonl"))
    assert any(r.get("event") == "resume" for r in records)
    straight_losses = [r["loss_ita"] for r in _read_jsonl(os.path.join(straight_run, "log.jsonl")) if "loss_ita" in r]
    assert [r["loss_ita"] for r in records if "loss_ita" in r] == straight_losses


def _dist_body(rank: int, world_size: int, config_path: str, out_dir: str) -> dict:
    # RANK/WORLD_SIZE/MASTER_* are set by run_distributed, so init_distributed joins a gloo group itself.
    result = train_retrieval.main(
        [
            "--config",
            config_path,
            "--output-dir",
            out_dir,
            "--options",
            "max_epoch=1",
            "negative_all_rank=true",
            "grad_accum_steps=2",
            "clip_grad_norm=1.0",
        ]
    )
    return {k: v.clone() for k, v in result["model"].state_dict().items()}


def test_two_process_ddp_keeps_ranks_identical(config_path, tmp_path):
    # Global batch 2 x 8 = 16 = queue_size; 3 micro-batches per rank: one accumulated step (no_sync) + one short.
    states = run_distributed(_dist_body, 2, config_path, str(tmp_path / "ddp"), init_process_group=False, timeout_s=120)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["ptr_queue"]) == 0  # 3 micro-batches x 16 = 48 = 3 full turns of the 16-slot queue
    assert (states[0]["idx_queue"] >= 0).all()  # every slot was written with gathered ids from both ranks
    records = _read_jsonl(str(tmp_path / "ddp" / "log.jsonl"))
    assert [r["step"] for r in records if "loss_ita" in r] == [2]  # 2 optimizer steps; the last one is logged
    assert os.path.isfile(tmp_path / "ddp" / "metrics_test.json")


def test_evaluate_mode_reproduces_the_selected_epoch(config_path, straight_run, tmp_path):
    out = tmp_path / "eval"
    _train(
        config_path, out, "--evaluate", "--options", f"pretrained={os.path.join(straight_run, 'checkpoint_best.pth')}"
    )
    assert not os.path.exists(out / "checkpoint_last.pth")
    for split in ("val", "test"):
        with open(os.path.join(straight_run, f"metrics_{split}.json")) as f:
            expected = json.load(f)
        with open(out / f"metrics_{split}.json") as f:
            got = json.load(f)
        for key in RECALL_KEYS:
            assert got[key] == pytest.approx(expected[key]), (split, key)


def test_custom_dataset_without_val_and_test_trains_and_skips_evaluation(config_path, tmp_path, capsys):
    out = tmp_path / "noeval"
    result = _train(config_path, out, "--options", "max_epoch=1", "val_file=null", "test_file=null")
    assert "no val split configured" in capsys.readouterr().out
    assert result["best_epoch"] == 0 and result["best_val"] is None and result["best_test"] is None
    assert os.path.isfile(out / "checkpoint_best.pth")  # nothing to select by: the last epoch
    assert not os.path.exists(out / "metrics_val.json") and not os.path.exists(out / "metrics_test.json")


def test_unknown_option_names_the_key_and_a_suggestion(config_path, tmp_path):
    with pytest.raises(ConfigError, match=r"'init_lrr'.*did you mean 'init_lr'"):
        _train(config_path, tmp_path / "x", "--options", "init_lrr=1e-4")


def test_queue_size_must_be_a_multiple_of_the_global_batch(config_path, tmp_path):
    with pytest.raises(ConfigError, match=r"queue_size 20 is not a multiple of the global batch 8.*e\.g\. 16"):
        _train(config_path, tmp_path / "x", "--options", "queue_size=20")


def test_train_state_reads_both_checkpoint_layouts():
    state = TrainState(epoch=3, global_step=40, best_metric=55.5, best_epoch=2, best_val={"r_mean": 55.5})
    assert TrainState.from_checkpoint({"train_state": state.to_dict()}) == state
    assert TrainState.from_checkpoint({"format": "blip-retrieval-train-v1", **state.to_dict()}) == state  # v1: flat


def test_itm_negative_schedule_reaches_the_training_steps(config_path, tmp_path):
    """warmup with 5 steps: the steps logged at 2 and 4 (0-based steps 1 and 3) drew uniform negatives, every
    later one hard negatives."""
    out = tmp_path / "warmup"
    _train(config_path, out, "--options", "max_epoch=1", "itm_negatives=warmup", "itm_negatives_steps=5")
    steps = [r for r in _read_jsonl(os.path.join(out, "log.jsonl")) if "loss_ita" in r]
    assert [(r["step"], r["itm_hard_fraction"]) for r in steps] == [(2, 0.0), (4, 0.0), (6, 1.0)]


def test_cli_turns_errors_into_a_one_line_exit(config_path, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_retrieval.py",
            "--config",
            config_path,
            "--output-dir",
            str(tmp_path),
            "--options",
            "batch_size_trian=4",
        ],
    )
    with pytest.raises(SystemExit, match=r"error: unknown config key 'batch_size_trian'.*'batch_size_train'"):
        utils.run_cli(train_retrieval.main)


@pytest.mark.parametrize("script", ["train", "eval"])
@pytest.mark.parametrize(
    "option, message",
    [
        (
            "text_encoder=/nonexistent/vocab.txt",
            r"tokenizer path '/nonexistent/vocab\.txt' \(config key text_encoder\) "
            r"does not exist",
        ),
        ("med_config=/nonexistent/med.json", r"med_config file not found: /nonexistent/med\.json"),
        ("med_config=BAD_JSON", r"med_config file .*bad\.json is not valid JSON"),
        ("med_config.hidden_sise=64", r"unknown MED config field\(s\) \['hidden_sise'\]"),
    ],
)
def test_model_config_errors_end_in_one_line(config_path, tmp_path, monkeypatch, capsys, script, option, message):
    """A wrong tokenizer path or MED config is a user error: one line on stderr, exit status 1, no traceback."""
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    option = option.replace("BAD_JSON", str(bad_json))
    argv = {
        "train": ["--config", config_path, "--output-dir", str(tmp_path / "out")],
        "eval": ["--config", config_path, "--checkpoint", "", "--output-dir", str(tmp_path / "out")],
    }[script]
    main = {"train": train_retrieval.main, "eval": eval_retrieval.main}[script]
    monkeypatch.setattr(sys, "argv", [f"{script}_retrieval.py", *argv, "--options", option])
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main)
    assert str(exit_info.value).startswith("error: ") and "\n" not in str(exit_info.value).strip()
    assert re.search(message, str(exit_info.value)), exit_info.value
    assert "Traceback" not in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_a_clear_error(config_path, tmp_path):
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint at .*checkpoint_last\.pth"):
        _train(config_path, tmp_path / "empty", "--resume")
    with pytest.raises(ConfigError, match=r"no checkpoint at .*missing\.pth"):
        _train(config_path, tmp_path / "empty", "--resume", str(tmp_path / "missing.pth"))


def test_existing_run_needs_resume_and_a_matching_architecture(config_path, straight_run, tmp_path):
    with pytest.raises(ConfigError, match=r"already holds a training run.*--resume"):
        _train(config_path, straight_run)
    last = os.path.join(straight_run, "checkpoint_last.pth")
    with pytest.raises(CheckpointError, match=r"different shape.*vision_proj"):
        _train(config_path, tmp_path / "a", "--resume", last, "--options", "embed_dim=32")
    with pytest.raises(CheckpointError, match=r"(?s)does not match.*MISSING.*visual_encoder"):
        _train(config_path, tmp_path / "b", "--resume", last, "--options", "vit.depth=3")


def test_missing_tensorboard_is_a_clear_error(config_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        _train(config_path, tmp_path / "tb", "--options", "tensorboard=true")


@pytest.mark.parametrize(
    ("name", "finetuned"),
    [
        ("https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_retrieval_coco.pth", True),
        ("/ckpt/model_large_retrieval_flickr.pth", True),
        ("/hf/blip-itm-base-coco/", True),
        ("/ckpt/model_base.pth", False),
        ("/ckpt/model_base_capfilt_large.pth", False),
        ("", False),
    ],
)
def test_retrieval_finetuned_checkpoints_are_recognised(name, finetuned):
    assert is_retrieval_finetuned(name) is finetuned


# ----------------------------------------------------------------------------- vit_ckpt_layer: auto


def test_vit_ckpt_layer_auto_is_accepted_and_other_words_are_not(config_path, tmp_path):
    with pytest.raises(ConfigError, match=r"'vit_ckpt_layer'.*expected one of auto, got 'all'"):
        _train(config_path, tmp_path / "x", "--options", "vit_ckpt_layer=all")
    with pytest.raises(ConfigError, match=r"'vit_ckpt_layer'.*expected a value >= 0, got -1"):
        _train(config_path, tmp_path / "y", "--options", "vit_ckpt_layer=-1")


def test_fit_ckpt_layers_follows_the_linear_memory_model():
    gib = 2**30
    # fixed 4 GiB, 1 GiB per image without checkpointing, 12 blocks saving 0.05 GiB per image each.
    peak_1, peak_2, peak_1_all = 5 * gib, 6 * gib, int(5 * gib - 12 * 0.05 * gib)
    fit = memory.fit_ckpt_layers
    assert fit(peak_1, peak_2, peak_1_all, 12, 32, 0, 40 * gib) == (0, 36 * gib)  # fits as it is
    # 32 images: 4 + 32 * (1 - 0.05 n) <= 33 needs n >= 1.875, so 2 blocks (estimate 32.8 GiB).
    blocks, estimate = fit(peak_1, peak_2, peak_1_all, 12, 32, 0, 33 * gib)
    assert blocks == 2 and estimate == pytest.approx(32.8 * gib, rel=1e-6)
    assert fit(peak_1, peak_2, peak_1_all, 12, 32, 3 * gib, 33 * gib)[0] == 4  # AdamW state counted: 3 GiB more
    assert fit(peak_1, peak_2, peak_1_all, 12, 32, 0, 10 * gib)[0] == 12  # never fits: everything checkpointed


def _tiny_train_model(config_path):
    config = schema.load_config(config_path, ["vit_grad_ckpt=true", "vit_ckpt_layer=auto"])
    torch.manual_seed(0)
    return build_model(config), config


def test_measure_step_peak_leaves_the_model_as_found(config_path):
    model, config = _tiny_train_model(config_path)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = utils.capture_rng_state()
    assert memory.measure_step_peak(model, 2, 1, config, torch.device("cpu")) == 0  # no GPU: no peak
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, momentum encoders, queues, pointer
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert not model.training and model.visual_encoder.ckpt_layer == 0


def test_choose_vit_ckpt_layers_on_a_gpu_fits_the_measured_model(config_path, monkeypatch):
    """The decision on a GPU, with the probe and the memory query faked (no GPU here)."""
    model, config = _tiny_train_model(config_path)
    depth, gib = len(model.visual_encoder.blocks), 2**30
    peaks = {(1, 0): 5 * gib, (2, 0): 6 * gib, (1, depth): 4 * gib}  # each block saves 0.5 GiB per image
    calls = []

    def fake_measure(model, batch_size, ckpt_layers, config, device):
        calls.append((batch_size, ckpt_layers))
        return peaks[batch_size, ckpt_layers]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    # batch 8: 4 GiB + AdamW state + 8 * (1 - 0.5 n) GiB must fit in 0.85 * 10 GiB: n = 1 (8.0 GiB + state).
    blocks = memory.choose_vit_ckpt_layers(model, config, torch.device("cuda"), measure=fake_measure)
    assert sorted(calls) == [(1, 0), (1, depth), (2, 0)] and blocks == 1


def test_vit_ckpt_layer_auto_trains_on_the_cpu_without_checkpointing(config_path, tmp_path, capsys):
    out = tmp_path / "auto"
    result = _train(config_path, out, "--options", "max_epoch=1", "vit_grad_ckpt=true", "vit_ckpt_layer=auto")
    assert "vit_ckpt_layer auto: no GPU memory to fit on the CPU" in capsys.readouterr().out
    assert result["model"].visual_encoder.ckpt_layer == 0
    events = [r for r in _read_jsonl(os.path.join(out, "log.jsonl")) if r.get("event") == "vit_ckpt_layer_auto"]
    assert events == [{"event": "vit_ckpt_layer_auto", "blocks": 0}]


# ----------------------------------------------------------------------------- compile: true


def test_compiled_training_keeps_the_tokenizer_eager_and_matches_eager(config_path, tmp_path, monkeypatch):
    """`compile: true` on the CPU. The tokenizer must run outside the compiled graph: traced, it was guarded on
    every token id and recompiled for every batch (145 s instead of 10 s for this run). With dropout off, the
    first ITC loss (independent of the sampled negatives) equals the eager run's."""
    calls_while_compiling = []

    class SpyTokenizer:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            calls_while_compiling.append(torch.compiler.is_compiling())
            return self.tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    load_model = retrieval_task.load_model

    def load_with_spy(*args, **kwargs):
        model, report = load_model(*args, **kwargs)
        model.tokenizer = SpyTokenizer(model.tokenizer)
        return model, report

    monkeypatch.setattr(retrieval_task, "load_model", load_with_spy)
    options = ["max_epoch=1", "med_config.hidden_dropout_prob=0.0", "med_config.attention_probs_dropout_prob=0.0"]
    _train(config_path, tmp_path / "eager", "--options", *options)
    _train(config_path, tmp_path / "compiled", "--options", *options, "compile=true")
    assert calls_while_compiling and not any(calls_while_compiling)
    eager, compiled = (
        [r for r in _read_jsonl(str(tmp_path / run / "log.jsonl")) if "loss_ita" in r] for run in ("eager", "compiled")
    )
    assert len(compiled) == len(eager) == 3  # 48 samples / batch 8 = 6 steps, logged every 2
    assert compiled[0]["loss_ita"] == pytest.approx(eager[0]["loss_ita"], rel=1e-4)

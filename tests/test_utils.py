"""Tests for utils.py: config, schedules, RNG, saving, logging and distributed helpers (2 real processes)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

import utils
from configs import schema
from configs.schema import load_config
from engine.retrieval_task import alpha_at
from engine.trainer import cosine_lr
from tests.dist_helpers import DistributedChildError, run_distributed
from utils import ConfigError

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def _write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_valid_and_cover_official_keys():
    official = (
        "image_root ann_root dataset pretrained vit vit_grad_ckpt vit_ckpt_layer batch_size_train "
        "batch_size_test init_lr image_size queue_size alpha k_test negative_all_rank weight_decay "
        "min_lr max_epoch"
    ).split()
    assert set(official) <= set(schema.DEFAULT_CONFIG)
    schema.validate_config(dict(schema.DEFAULT_CONFIG))


def test_load_merges_over_defaults_and_parses_scientific_floats(tmp_path):
    path = _write(tmp_path, "dataset: coco\nk_test: 256\ninit_lr: 1e-5\nmin_lr: 0\nnegative_all_rank: true\n")
    cfg = load_config(path)
    assert cfg["dataset"] == "coco" and cfg["k_test"] == 256 and cfg["negative_all_rank"] is True
    assert cfg["init_lr"] == 1e-5 and isinstance(cfg["init_lr"], float)  # PyYAML alone gives '1e-5'
    assert cfg["min_lr"] == 0.0 and isinstance(cfg["min_lr"], float)
    assert cfg["queue_size"] == 57600 and cfg["embed_dim"] == 256  # untouched defaults
    assert schema.DEFAULT_CONFIG["dataset"] == "flickr"  # defaults not mutated


def test_overrides_dotted_and_yaml_typed(tmp_path):
    path = _write(tmp_path, "vit: {width: 64, depth: 2, heads: 4}\nimage_size: 32\n")
    cfg = load_config(
        path,
        [
            "init_lr=5e-6",
            "vit.depth=3",
            "vit.patch_size=8",
            "image_size=40",
            "vit_grad_ckpt=true",
            "med_config={hidden_size: 32}",
            "train_file=a.json",
        ],
    )
    assert cfg["init_lr"] == 5e-6 and isinstance(cfg["init_lr"], float)
    assert cfg["vit"] == {"width": 64, "depth": 3, "heads": 4, "patch_size": 8}
    assert cfg["image_size"] == 40 and cfg["vit_grad_ckpt"] is True
    assert cfg["med_config"] == {"hidden_size": 32} and cfg["train_file"] == "a.json"
    # Later overrides win; a value may itself contain '='.
    assert load_config(path, ["k_test=3", "k_test=4", "pretrained=a=b"])["k_test"] == 4
    assert load_config(path, ["pretrained=a=b"])["pretrained"] == "a=b"


def test_empty_file_means_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == schema.DEFAULT_CONFIG


@pytest.mark.parametrize(
    "text, overrides, needles",
    [
        ("k_tset: 5\n", [], ["'k_tset'", "cfg.yaml", "did you mean 'k_test'"]),
        ("", ["k_tset=5"], ["'k_tset'", "override", "did you mean 'k_test'"]),
        ("vit: {width: 64, depth: 2, heads: 4, dpeth: 2}\n", [], ["'vit.dpeth'", "cfg.yaml", "'depth'"]),
        ("vit: {width: 64, depth: 2, heads: 4}\n", ["vit.hedas=2"], ["'vit.hedas'", "'heads'"]),
        ("vit: {width: 64, depth: 2}\n", [], ["'vit'", "missing heads"]),
        ("vit: {width: 64, depth: 2, heads: 5}\n", [], ["'vit'", "not divisible"]),
        ("vit: {width: 64, depth: two, heads: 4}\n", [], ["'vit.depth'", "positive int"]),
        ("", ["vit.depth=2"], ["'vit.depth'", "'vit'", "not a mapping"]),
        ("batch_size_train: 3.5\n", [], ["'batch_size_train'", "cfg.yaml", "an int", "3.5"]),
        ("batch_size_train: true\n", [], ["'batch_size_train'", "an int"]),  # bool is not an int
        ("init_lr: abc\n", [], ["'init_lr'", "a number"]),
        ("vit_grad_ckpt: 1\n", [], ["'vit_grad_ckpt'", "true/false"]),
        ("image_root: 5\n", [], ["'image_root'", "a string"]),
        ("med_config: 5\n", [], ["'med_config'", "a string or a mapping"]),
        ("dataset: flikr\n", [], ["'dataset'", "cfg.yaml", "flickr, coco, custom", "'flikr'"]),
        ("", ["amp=fp8"], ["'amp'", "override", "bf16, fp16, none"]),
        ("vit: huge\n", [], ["'vit'", "base, large"]),
        ("eval_mode: slow\n", [], ["'eval_mode'", "fast, official"]),
        ("device: tpu\n", [], ["'device'", "auto, cuda, cpu"]),
        ("k_test: 0\n", [], ["'k_test'", ">= 1"]),
        ("max_epoch: -1\n", [], ["'max_epoch'", ">= 0"]),
        ("alpha: 1.5\n", [], ["'alpha'", "[0, 1]"]),
        ("image_size: 100\n", [], ["'image_size'", "patch size 16"]),
        ("amp: fp16\namp_cpu: true\n", [], ["'amp_cpu'", "cfg.yaml", "bf16 only", "'fp16'"]),
        ("- a\n- b\n", [], ["cfg.yaml", "mapping", "list"]),
        ("a: [1\n", [], ["cfg.yaml", "not valid YAML"]),
        ("", ["novalue"], ["'novalue'", "key=value"]),
        ("", [".x=1"], ["'.x=1'", "key=value"]),
    ],
)
def test_config_errors_name_the_key_and_file(tmp_path, text, overrides, needles):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        _write(tmp_path, "vit: {width: 64, depth: 2, heads: 4, patch_size: 8}\nimage_size: 32\n"),
        ["init_lr=3e-6", "med_config={hidden_size: 32, num_hidden_layers: 2}"],
    )
    out = str(tmp_path / "out" / "config.yaml")
    schema.save_config(cfg, out)
    assert not os.path.exists(out + ".tmp")
    assert list(yaml.safe_load(open(out))) == list(cfg)  # key order kept
    assert load_config(out) == cfg


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def test_autocast_is_cuda_only_unless_amp_cpu():
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    with utils.autocast(cpu, "bf16"):
        assert (x @ x).dtype == torch.float32  # the default: CPU runs fp32
    with utils.autocast(cpu, "none", amp_cpu=True):
        assert (x @ x).dtype == torch.float32
    with utils.autocast(cpu, "bf16", amp_cpu=True):
        assert (x @ x).dtype == torch.bfloat16


def test_cosine_lr_matches_official_values():
    expected = [1.0e-5, 9.330e-6, 7.5e-6, 5.0e-6, 2.5e-6, 6.70e-7]
    got = [cosine_lr(e, 6, 1e-5, 0.0) for e in range(6)]
    assert got == pytest.approx(expected, rel=1e-3)
    assert cosine_lr(6, 6, 1e-5, 1e-6) == pytest.approx(1e-6)


def test_alpha_ramp():
    assert alpha_at(0, 100, 0, 0.4) == 0.0
    assert alpha_at(50, 100, 0, 0.4) == pytest.approx(0.2)
    assert alpha_at(99, 100, 0, 0.4) == pytest.approx(0.396)
    assert alpha_at(150, 100, 0, 0.4) == pytest.approx(0.4)  # capped
    assert alpha_at(0, 100, 1, 0.4) == 0.4 and alpha_at(3, 0, 0, 0.4) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------
# Seeding, saving, logging, metrics table
# ---------------------------------------------------------------------------------------------------


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_set_seed_and_rng_capture_restore(tmp_path):
    utils.set_seed(7)
    first = _draws()
    utils.set_seed(7)
    assert _draws() == first
    np.random.randn()  # leave a cached gaussian so that part of the numpy state is exercised too
    state = utils.capture_rng_state()
    path = str(tmp_path / "rng.pth")
    utils.atomic_save(state, path)
    expected = _draws()
    _draws()  # move every generator on
    restore_from = torch.load(path, weights_only=True)  # the state must load under the safe loader
    utils.restore_rng_state(restore_from)
    assert _draws() == expected


def test_atomic_save_leaves_no_tmp(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pth")
    utils.atomic_save({"a": torch.arange(3)}, path)
    utils.atomic_save({"a": torch.arange(4)}, path)  # overwrite in place
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]
    assert torch.load(path)["a"].tolist() == [0, 1, 2, 3]


def test_jsonl_logger(tmp_path):
    logger = utils.JsonlLogger(str(tmp_path / "log.jsonl"))
    logger.log({"epoch": 0, "loss": torch.tensor(1.5), "lr": np.float32(0.5)})
    logger.log({"epoch": 1, "r_mean": 80.25})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"epoch": 0, "loss": 1.5, "lr": 0.5}, {"epoch": 1, "r_mean": 80.25}]


# ---------------------------------------------------------------------------------------------------
# Distributed: single process
# ---------------------------------------------------------------------------------------------------


def test_single_process_helpers(capsys):
    assert not utils.is_dist_initialized()
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()
    utils.barrier()
    t = torch.randn(3, 2, requires_grad=True)
    assert utils.all_gather_concat(t) is t
    assert utils.all_gather_with_grad(t) is t
    s = torch.ones(2)
    assert utils.all_reduce_sum_(s) is s and s.tolist() == [1.0, 1.0]
    utils.log("hello")
    assert capsys.readouterr().out == "hello\n"
    utils.cleanup_distributed()  # no-op without a group


def test_init_distributed_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    info = utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)
    assert info.device == torch.device("cpu") and not utils.is_dist_initialized()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert utils.init_distributed("auto").device.type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="device 'cuda' requested.*device: cpu"):
        utils.init_distributed("cuda")


# ---------------------------------------------------------------------------------------------------
# Distributed: two real gloo processes
# ---------------------------------------------------------------------------------------------------


def _gather_body(rank: int, world_size: int) -> dict:
    rows = 3
    local = torch.full((rows, 2), float(rank)) + torch.arange(rows * 2, dtype=torch.float32).view(rows, 2)
    gathered = utils.all_gather_concat(local)
    # Each rank weights the gathered matrix differently, so the true gradient needs every rank's loss.
    x = local.clone().requires_grad_(True)
    weights = torch.arange(world_size * rows * 2, dtype=torch.float32).view(-1, 2) * (rank + 1)
    loss = (utils.all_gather_with_grad(x) * weights).sum()
    loss.backward()
    summed = utils.all_reduce_sum_(torch.tensor([float(rank + 1)]))
    utils.barrier()
    return {
        "rank": utils.get_rank(),
        "world": utils.get_world_size(),
        "main": utils.is_main_process(),
        "gathered": gathered,
        "grad": x.grad,
        "summed": summed.item(),
    }


def test_two_process_gather_and_gradient():
    rows, world = 3, 2
    results = run_distributed(_gather_body, world)
    expected_gather = torch.cat(
        [torch.full((rows, 2), float(r)) + torch.arange(6.0).view(rows, 2) for r in range(world)]
    )
    base = torch.arange(world * rows * 2, dtype=torch.float32).view(-1, 2)
    total_weights = sum(base * (r + 1) for r in range(world))  # d(sum of all ranks' losses)/d(gathered)
    for rank, res in enumerate(results):
        assert (res["rank"], res["world"], res["main"]) == (rank, world, rank == 0)
        assert torch.equal(res["gathered"], expected_gather)
        assert torch.equal(res["grad"], total_weights[rank * rows : (rank + 1) * rows])
        assert res["summed"] == 3.0


def _init_body(rank: int, world_size: int) -> tuple:
    info = utils.init_distributed("cpu")  # reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set by the helper
    backend = torch.distributed.get_backend()
    gathered = utils.all_gather_concat(torch.tensor([rank * 10]))
    utils.cleanup_distributed()
    return (
        info.rank,
        info.world_size,
        info.local_rank,
        info.distributed,
        str(info.device),
        backend,
        gathered.tolist(),
        utils.is_dist_initialized(),
    )


def test_init_distributed_from_env_two_processes():
    results = run_distributed(_init_body, 2, init_process_group=False)
    for rank, res in enumerate(results):
        assert res == (rank, 2, rank, True, "cpu", "gloo", [0, 10], False)


def _failing_body(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("boom on rank 1")


def test_run_distributed_propagates_child_exceptions():
    # Rank 1 raises at once, often before rank 0 has finished connecting; rank 0 then fails too (gloo: connection
    # closed by peer) and spawn may report either. The helper reports every failed rank, so the original is there.
    with pytest.raises(DistributedChildError, match="(?s)rank 1:.*boom on rank 1"):
        run_distributed(_failing_body, 2)


def _failing_body_after_rank0_fails(rank: int, world_size: int) -> None:
    if rank == 0:
        raise RuntimeError("boom on rank 0")
    dist.barrier()  # rank 1 waits for rank 0, which never comes: its own error follows from rank 0's


def test_run_distributed_reports_the_original_error_when_a_peer_fails_because_of_it():
    with pytest.raises(DistributedChildError, match="(?s)rank 0:.*boom on rank 0"):
        run_distributed(_failing_body_after_rank0_fails, 2, timeout_s=20)


def test_download_file_fails_on_a_stalled_server_instead_of_hanging(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: the download ends with an OSError after
    DOWNLOAD_TIMEOUT_S, leaves no file behind, and restores the process-wide socket timeout."""
    import socket

    monkeypatch.setattr(utils, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel accepts the connection; nobody ever reads the request
        url = f"http://127.0.0.1:{server.getsockname()[1]}/model.pth"
        before = socket.getdefaulttimeout()
        with pytest.raises(OSError):
            utils.download_file(url, str(tmp_path / "model.pth"), progress=False)
    assert socket.getdefaulttimeout() == before
    assert list(tmp_path.iterdir()) == []

"""Where the time goes at small sizes on a CPU: torch.profiler top operators of one training step and one fast
evaluation (ViT-B/16 + BERT-base, 128 px), written as tables beside this file.

    OMP_NUM_THREADS=1 python results/gpu_prep_2026-12-02/profile_cpu.py
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
from torch.profiler import ProfilerActivity, profile

from bench import bench_train
from bench.bench_eval import bench_config, make_data, make_model
from data import create_dataset
from engine.evaluation import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)


def table(prof, title: str, path: str) -> None:
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=45)
    with open(os.path.join(HERE, path), "w") as f:
        f.write(f"{title}\n\n{text}\n")
    print(title, "\n", text)


args = bench_train.parse_args(["--device", "cpu", "--batch-size", "4", "--image-size", "128", "--queue-size", "64"])
model, init_state, (images, captions, idx), _ = bench_train.setup(args, torch.device("cpu"))
model.train()
out = model(images, captions, 0.4, idx)  # warm-up
(out["loss_ita"] + out["loss_itm"]).backward()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    out = model(images, captions, 0.4, idx)
    (out["loss_ita"] + out["loss_itm"]).backward()
table(
    prof,
    "training step (forward + backward, no optimizer), ViT-B/16 + BERT-base, batch 4, 128 px, fp32, 1 thread",
    "profile_train_step_cpu.txt",
)
del model

with tempfile.TemporaryDirectory() as tmp:
    paths = make_data(tmp, 8, 5, 128)
    config = bench_config(paths, "base", "base", 128, k_test=8, device="cpu", num_workers=0)
    config = dict(config, eval_mode="fast", eval_amp="none")
    dataset = create_dataset(config, "test")
    model = make_model(config, 0, torch.device("cpu")).eval()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(model, dataset, config, torch.device("cpu"), desc="profile")
table(
    prof,
    "evaluation, eval_mode fast, fp32, 8 images / 40 captions, k_test 8, ViT-B/16 + BERT-base, 128 px, 1 thread",
    "profile_eval_fast_cpu.txt",
)

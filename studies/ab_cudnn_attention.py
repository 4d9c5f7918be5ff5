"""A/B of the fast evaluation with and without PyTorch's cuDNN attention backend (CUDA only).

    python -m studies.ab_cudnn_attention [--num-images 200] [--repeats 2] [--amp bf16 none]

The fast evaluation keeps SDPA off the cuDNN backend in the fast mode (AVOID_CUDNN_ATTENTION): cuDNN builds an
execution plan for every new input shape, and the fast mode's length-cut batches come in many shapes. This
script evaluates the same generated data with the same random-init model, alternating the two settings,
and prints the phase times of each run. R@1 is printed to show the scores do not depend on the setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import engine.features
from bench.bench_eval import bench_config, make_data, make_model
from data import create_dataset
from engine.evaluation import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--k-test", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--amp", nargs="+", default=["bf16", "none"], choices=["bf16", "fp16", "none"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this A/B needs a CUDA GPU")
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory(prefix="ab_cudnn_") as tmp:
        paths = make_data(tmp, args.num_images, 5, args.image_size, seed=0)
        config = bench_config(
            paths, "base", "base", args.image_size, k_test=args.k_test, num_workers=4, device="cuda", seed=0
        )
        dataset = create_dataset(config, "test")
        model = make_model(config, 0, device)
        for amp in args.amp:
            for _ in range(args.repeats):
                for avoid in (True, False):
                    engine.features.AVOID_CUDNN_ATTENTION = avoid
                    run_config = dict(config, eval_mode="fast", eval_amp=amp)
                    m = evaluate(model, dataset, run_config, device).metrics
                    setting = "off" if avoid else "on "
                    print(
                        f"amp {amp:4} cuDNN attention {setting}: text {m['time_text_features']:.2f}s "
                        f"image {m['time_image_features']:.2f}s re-rank {m['time_rerank']:.2f}s total "
                        f"{m['time_total']:.2f}s; R@1 TR {m['txt_r1']:.2f} IR {m['img_r1']:.2f}",
                        flush=True,
                    )
    engine.features.AVOID_CUDNN_ATTENTION = True


if __name__ == "__main__":
    main()

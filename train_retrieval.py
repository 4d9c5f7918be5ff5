"""Fine-tune BLIP for image-text retrieval (ITC + ITM), then select the epoch by val r_mean.

    python train_retrieval.py --config configs/retrieval_flickr.yaml --output-dir output/flickr \
        [--resume [CKPT]] [--evaluate] [--options key=value ...]
    torchrun --nproc_per_node=8 train_retrieval.py ...          (DDP: NCCL on GPU, gloo on CPU)

Outputs in --output-dir: config.yaml (resolved), log.jsonl (one object per logged step and per epoch),
checkpoint_last.pth (everything for an exact resume, engine/trainer.py), checkpoint_best.pth (by val r_mean),
and metrics_val.json / metrics_test.json of the selected epoch. Test is scored only with the weights of the epoch
that val selected, and re-scored whenever the selection changes, so test numbers are never stale.

The task (model, data, loss, evaluation) is engine/retrieval_task.py; the loop is engine/trainer.py.
"""

from __future__ import annotations

import utils
from engine import trainer
from engine.retrieval_task import RetrievalTask


def main(argv: list[str] | None = None) -> dict:
    """Run training (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'best_test'}."""
    return trainer.main(
        RetrievalTask,
        argv,
        description=__doc__.split("\n\n")[0],
        writes="checkpoints, logs and metrics",
        evaluate_help="evaluate val and test with `pretrained`, no training",
    )


if __name__ == "__main__":
    utils.run_cli(main)

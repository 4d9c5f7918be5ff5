"""Composed image retrieval on CIRR with BLIP (CoVR's recipe): fine-tune with HN-NCE, select the epoch by val
(R@5 + Rs@1)/2, and write the test1 submission files of the selected epoch.

    python train_cirr.py --config configs/cirr.yaml --output-dir output/cirr [--resume [CKPT]] [--options k=v ...]
    python train_cirr.py --config configs/cirr.yaml --output-dir output/cirr_zs --evaluate   (the `pretrained` weights)
    torchrun --nproc_per_node=2 train_cirr.py ...   (CoVR: 2 GPUs x 512 = a global batch of 1,024)

Outputs in --output-dir: config.yaml (resolved), log.jsonl, checkpoint_last.pth (exact resume, engine/trainer.py),
checkpoint_best.pth, metrics_val.json (R@1/5/10/50, Rs@1/2/3, r_avg, the gallery and targets they were computed
with, the checkpoint and epoch they belong to), metrics_test1.json (counts only: test1 has no targets) and
cirr_submission_test1_{recall,recall_subset}.json, the two files the CIRR evaluation server takes. With
--save-scores also scores_{val,test1}.npz (the score matrix and per-query ranks; keys in engine.cir.write_cirr_outputs).
HN-NCE's global batch is batch_size_train x the number of processes (all ranks' pairs are contrasted together).

The task is engine/cir_task.py; the loop is engine/trainer.py.
"""

from __future__ import annotations

import utils
from engine import trainer
from engine.cir_task import CirTask


def main(argv: list[str] | None = None) -> dict:
    """Train (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'best_test'} (+ 'results' with --evaluate)."""
    return trainer.main(
        CirTask,
        argv,
        description=__doc__.split("\n\n")[0],
        writes="checkpoints, logs, metrics and submissions",
        evaluate_help="evaluate val and test1 with `pretrained`, no training",
    )


if __name__ == "__main__":
    utils.run_cli(main)

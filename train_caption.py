"""Fine-tune BLIP's captioner (ViT + MED decoder) with the LM loss, select the epoch by val CIDEr + BLEU-4.

    python train_caption.py --config configs/caption_coco.yaml --output-dir output/caption \
        [--resume [CKPT]] [--evaluate] [--options key=value ...]
    torchrun --nproc_per_node=8 train_caption.py ...          (DDP: NCCL on GPU, gloo on CPU)

Official recipe (salesforce/BLIP train_caption.py): AdamW over all parameters, cosine LR per epoch, label
smoothing 0.1, prompt tokens outside the loss, beam search (3 beams, 20 / 5 tokens) for evaluation, the epoch with
the best val CIDEr + BLEU-4 kept. Outputs in --output-dir: config.yaml, log.jsonl, checkpoint_last.pth (everything
for an exact resume), checkpoint_best.pth, caption_metrics_{val,test}.json and captions_{val,test}.json (official
results format) of the selected epoch; test is scored only with the selected weights.

The task is engine/caption_task.py; the loop is engine/trainer.py.
"""

from __future__ import annotations

import utils
from engine import trainer
from engine.caption_task import CaptionTask


def main(argv: list[str] | None = None) -> dict:
    """Run training (or --evaluate). Returns {'model', 'best_epoch', 'best_val', 'best_test'}."""
    return trainer.main(
        CaptionTask,
        argv,
        description=__doc__.split("\n\n")[0],
        writes="checkpoints, logs, captions and metrics",
        evaluate_help="caption and score val and test with `pretrained`",
    )


if __name__ == "__main__":
    utils.run_cli(main)

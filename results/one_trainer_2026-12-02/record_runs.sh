#!/usr/bin/env bash
# Record the four demo runs with fixed seeds, one thread, no workers. Usage: record_baseline.sh REPO OUT
set -euo pipefail
REPO=$(realpath $1); OUT=$(realpath -m $2)
PY=${PY:-$(pwd)/.venv/bin/python}  # run from the repository root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
mkdir -p $OUT; cd $REPO
[ -d $OUT/data ] || $PY -m data.synthetic --out $OUT/data > $OUT/gen.log 2>&1
[ -d $OUT/cirr_data ] || $PY -m data.cirr_synthetic --out $OUT/cirr_data --extra-vocab $OUT/data/vocab.txt >> $OUT/gen.log 2>&1
D=$OUT/data
COMMON="num_workers=0 image_root=$D/images train_file=$D/annotations/synthetic_train.json val_file=$D/annotations/synthetic_val.json test_file=$D/annotations/synthetic_test.json text_encoder=$D/vocab.txt"
rm -rf $OUT/retrieval $OUT/clip $OUT/caption $OUT/cir
$PY train_retrieval.py --config configs/demo.yaml --output-dir $OUT/retrieval --options $COMMON max_epoch=6 > $OUT/retrieval.log 2>&1
$PY eval_retrieval.py --config configs/demo.yaml --checkpoint $OUT/retrieval/checkpoint_best.pth --output-dir $OUT/retrieval/eval --save-scores --options $COMMON >> $OUT/retrieval.log 2>&1
$PY train_retrieval.py --config configs/demo_clip.yaml --output-dir $OUT/clip --options $COMMON max_epoch=4 > $OUT/clip.log 2>&1
$PY train_caption.py --config configs/demo_caption.yaml --output-dir $OUT/caption --options $COMMON max_epoch=2 > $OUT/caption.log 2>&1
$PY train_cirr.py --config configs/cirr_demo.yaml --output-dir $OUT/cir --options num_workers=0 cirr_ann_root=$OUT/cirr_data cirr_image_root=$OUT/cirr_data/img_raw text_encoder=$OUT/cirr_data/vocab.txt pretrained=$OUT/retrieval/checkpoint_best.pth max_epoch=3 > $OUT/cir.log 2>&1
echo done

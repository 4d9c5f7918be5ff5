"""What the entry-point scripts share, between them and models/ + data/.

- evaluation.py: evaluate one split (ITC ranking, ITM re-ranking or ITC alone for CLIP, metrics), write its files
- features.py: ITC text and image features, image tokens, evaluation precision
- itm_rerank.py: official and fast ITM re-ranking of the ITC top k
- metrics.py: recall, ranks, R-Precision, per-query ranks, the paper-style table
- training.py: the ITC+ITM training loop, its state and its checkpoint
- memory.py: `vit_ckpt_layer: auto`, the fewest checkpointed ViT blocks that fit the GPU
- search_index.py, search_query.py, search_server.py: the photo search of search.py (index, query, web server)
- report.py: compare evaluation runs (metrics table, recall@K and rank-histogram PNGs, phenomenon buckets, gallery)
- generation.py: caption generation (beam search, greedy, nucleus sampling) with cached keys/values
- caption_metrics.py: COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D)
- captioning.py: caption a split across ranks, score it, the LM training epoch, ITM scores for CapFilt

Imports go one way: scripts -> engine -> models, data -> utils.
"""

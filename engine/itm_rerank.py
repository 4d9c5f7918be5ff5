"""ITM re-ranking of the ITC top k: the official per-query algorithm and the fast one that gives the same scores.

The score of a re-ranked pair is the ITM "match" logit plus the ITC cosine (`rerank_score: official`), or
log P_ITM(match) + cosine / temp (`rerank_score: calibrated`, see `rerank_score`). Pairs outside a query's top k get
`cosine - 100`: every re-ranked pair stays above them, as with the official flat -100, and their ITC order is
kept so that mean and median ranks mean something (the official ties make them arbitrary). R@K for K <= k_test
is identical to the official definition.

- `rerank_official`: one ITM batch of k_test pairs per query, fp32, text padded to max_length, image tokens on
  the CPU, every layer computed for every token. Kept for verification and as the benchmark baseline.
- `rerank_fast`: the union of the image->text and text->image top-k pairs is scored once per pair, grouped by
  image: each image's cross-attention keys/values are projected once per layer and shared by all texts scored
  against it; texts are scored shortest first, in batches with little padding; the last layer computes only the
  [ENC] position (the only one ITM reads); images are sharded across ranks. On a GPU, where launching a
  forward's kernels costs more than computing a few hundred short texts, texts of up to KV_CHUNK images share
  one forward (`plan_itm_forwards`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from configs.schema import CONFIG_CHOICES
from engine.features import MAX_PADDING, eval_autocast, length_batches
from models.blip2 import Blip2Retrieval
from models.blip_retrieval import BlipRetrieval
from utils import all_reduce_sum_, get_rank, get_world_size, shard_range

OUTSIDE_TOP_K = -100.0
KV_CHUNK = 32  # fast mode: images whose cross-attention keys/values are projected (and streamed) together
# Fast mode on a GPU: one ITM forward of a few hundred short texts costs less than launching its ~400 kernels,
# so texts of several images share a forward, in pieces of ITM_PIECE texts per image (see plan_itm_forwards).
# On a CPU the arithmetic dominates, and each forward holds the texts of one image (no filler rows).
ITM_PIECE = {"cuda": 16}
RERANK_SCORES = CONFIG_CHOICES["rerank_score"]


def rerank_score(itm_logits: torch.Tensor, cosines: torch.Tensor, mode: str, temp: float) -> torch.Tensor:
    """The score of re-ranked pairs from their ITM logits (N, 2) and ITC cosines (N,).

    official: the ITM match logit + the cosine. The cosine then only breaks near-ties: inside a top k its spread
        is a few hundredths, the logit's several units, so the ITM head alone orders the shortlist. That suits a
        pre-trained ITM head, which ranks better than ITC.
    calibrated: log P_ITM(match) + cosine / temp, each head's log-score on the scale it was trained on (temp is
        the ITC temperature): a product of the two experts. It helps where ITM knows something ITC does not
        without being the better ranker on its own, as a head trained from scratch
        (docs/notes/itm_from_scratch.md). An option, not the official score.
    """
    if mode == "official":
        return itm_logits[:, 1].float() + cosines
    if mode == "calibrated":
        return torch.log_softmax(itm_logits.float(), dim=1)[:, 1] + cosines / temp
    raise ValueError(f"rerank_score must be one of {RERANK_SCORES}, got {mode!r}")


@dataclass
class ItmForward:
    """One ITM forward of the fast re-ranking: `images[p]` is the image of piece p (an index within its KV chunk),
    `rows` the pair positions, `len(rows) // len(images)` per piece, pieces contiguous; `real` the indices into
    `rows` of the rows that are scored (the others are filler repeating a real row); `max_len` the text length
    every row is padded to."""

    images: list[int]
    rows: list[int]
    real: list[int]
    max_len: int


def plan_itm_forwards(
    counts: list[int], lengths: list[int], max_batch: int, piece: int | None = None, max_padding: float = MAX_PADDING
) -> Iterator[list[ItmForward]]:
    """The ITM forwards of the fast re-ranking, chunk by chunk of KV_CHUNK images (a generator: the host plans
    the next chunk while the GPU runs the current one, and COCO's millions of pairs are never listed at once).

    `counts[j]` is the number of pairs of image j; pairs are numbered image by image, and `lengths` gives each
    pair's text length, ascending within an image. Without `piece`, a forward holds texts of one image,
    `length_batches` of them. With `piece`, each image's texts are cut into pieces of `piece` texts (its last piece
    filled up by repeating its longest text, whose score is discarded); the pieces of a chunk are sorted by their
    longest text and `length_batches` groups them, at most max_batch // piece per forward. Each row of a
    piece attends to its own image's keys/values (BertSelfAttention folds a piece into one query sequence).
    """
    first = 0
    for chunk_start in range(0, len(counts), KV_CHUNK):
        forwards = []
        if piece is None:
            for local, count in enumerate(counts[chunk_start : chunk_start + KV_CHUNK]):
                for start, end in length_batches(lengths[first : first + count], max_batch, max_padding):
                    rows = list(range(first + start, first + end))
                    forwards.append(ItmForward([local], rows, list(range(len(rows))), lengths[rows[-1]]))
                first += count
        else:
            pieces = []  # (longest text, image, rows)
            for local, count in enumerate(counts[chunk_start : chunk_start + KV_CHUNK]):
                for start in range(first, first + count, piece):
                    rows = list(range(start, min(start + piece, first + count)))
                    pieces.append((lengths[rows[-1]], local, rows + rows[-1:] * (piece - len(rows))))
                first += count
            pieces.sort(key=lambda p: p[0])
            for start, end in length_batches([p[0] for p in pieces], max(1, max_batch // piece), max_padding):
                group = pieces[start:end]
                rows = [row for p in group for row in p[2]]
                real = [i for i, row in enumerate(rows) if i % piece == 0 or row != rows[i - 1]]
                forwards.append(ItmForward([p[1] for p in group], rows, real, group[-1][0]))
        yield forwards


def _to_device(index_lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Host index lists as device tensors, through one pinned buffer and one non-blocking copy on CUDA."""
    flat = torch.tensor([i for lst in index_lists for i in lst], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(torch.split(flat, [len(lst) for lst in index_lists]))


def _fill_outside(sims: torch.Tensor) -> torch.Tensor:
    return sims + OUTSIDE_TOP_K


@dataclass
class TopKPairs:
    """The union of both directions' top-k pairs of a similarity matrix, each pair once: `keys` (image * N_txt +
    text, sorted, so every image's pairs are contiguous), their `image` and `text`, and where each direction's
    top-k lists sit (`topk_i2t` (N_img, k) text ids, `topk_t2i` (N_txt, k) image ids, their pair keys)."""

    keys: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    topk_i2t: torch.Tensor
    topk_t2i: torch.Tensor
    keys_i2t: torch.Tensor
    keys_t2i: torch.Tensor

    @staticmethod
    def of(sims: torch.Tensor, k_test: int) -> TopKPairs:
        n_img, n_txt = sims.shape
        topk_i2t = sims.topk(min(k_test, n_txt), dim=1).indices
        topk_t2i = sims.t().topk(min(k_test, n_img), dim=1).indices
        keys_i2t = (torch.arange(n_img, device=sims.device)[:, None] * n_txt + topk_i2t).flatten()
        keys_t2i = (topk_t2i * n_txt + torch.arange(n_txt, device=sims.device)[:, None]).flatten()
        keys = torch.unique(torch.cat([keys_i2t, keys_t2i]))  # sorted
        return TopKPairs(keys, keys // n_txt, keys % n_txt, topk_i2t, topk_t2i, keys_i2t, keys_t2i)

    def score_matrices(
        self, sims: torch.Tensor, pair_logits: torch.Tensor, modes: tuple[str, ...], temp: float
    ) -> tuple[torch.Tensor, ...]:
        """(scores_i2t, scores_t2i) per score mode, from every pair's ITM logits (N_pairs, 2): re-ranked pairs get
        `rerank_score`, the others `cosine - 100`."""
        n_img, n_txt = sims.shape
        pair_cosines = sims[self.image, self.text].float()
        i2t_at, t2i_at = torch.searchsorted(self.keys, self.keys_i2t), torch.searchsorted(self.keys, self.keys_t2i)
        matrices = []
        for mode in modes:
            pair_scores = rerank_score(pair_logits, pair_cosines, mode, temp)
            scores_i2t = _fill_outside(sims.clone())
            scores_i2t.scatter_(1, self.topk_i2t, pair_scores[i2t_at].view(n_img, -1).to(scores_i2t.dtype))
            scores_t2i = _fill_outside(sims.t().contiguous())
            scores_t2i.scatter_(1, self.topk_t2i, pair_scores[t2i_at].view(n_txt, -1).to(scores_t2i.dtype))
            matrices += [scores_i2t, scores_t2i]
        return tuple(matrices)


@torch.no_grad()
def rerank_official(
    model: BlipRetrieval,
    sims: torch.Tensor,
    image_tokens: torch.Tensor,
    text_ids: torch.Tensor,
    text_atts: torch.Tensor,
    k_test: int,
    device: torch.device,
    show_progress: bool = False,
    score: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference algorithm: one ITM batch of k_test pairs per query, queries split across ranks. `score`:
    see `rerank_score`. For BLIP-2 this is LAVIS's compute_sim_matrix (the mean match logit over the queries + the
    query-max ITC similarity, with the `official` score)."""
    rank, world = get_rank(), get_world_size()
    temp = float(model.temp.detach())
    # BLIP runs its whole last layer here as the official code does; BLIP-2 (LAVIS compute_itm) reads every query.
    itm_options = {"cls_only": False} if isinstance(model, BlipRetrieval) else {}
    n_img, n_txt = sims.shape
    scores_i2t = torch.zeros(n_img, n_txt, device=device)  # summed across ranks: each row filled by one rank
    scores_t2i = torch.zeros(n_txt, n_img, device=device)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    start, end = shard_range(n_img, rank, world)
    for i in tqdm(range(start, end), desc="ITM i2t", disable=not show_progress):
        topk_sim, topk_idx = sims[i].topk(k_i2t)
        encoder_states = image_tokens[i].repeat(k_i2t, 1, 1).to(device)
        itm = model.itm_logits(text_ids[topk_idx], text_atts[topk_idx], encoder_states, **itm_options)
        scores_i2t[i] = _fill_outside(sims[i])
        scores_i2t[i, topk_idx] = rerank_score(itm, topk_sim, score, temp)
    sims_t = sims.t()
    start, end = shard_range(n_txt, rank, world)
    for t in tqdm(range(start, end), desc="ITM t2i", disable=not show_progress):
        topk_sim, topk_idx = sims_t[t].topk(k_t2i)
        encoder_states = image_tokens[topk_idx.cpu()].to(device)
        itm = model.itm_logits(
            text_ids[t].repeat(k_t2i, 1), text_atts[t].repeat(k_t2i, 1), encoder_states, **itm_options
        )
        scores_t2i[t] = _fill_outside(sims_t[t])
        scores_t2i[t, topk_idx] = rerank_score(itm, topk_sim, score, temp)
    return all_reduce_sum_(scores_i2t), all_reduce_sum_(scores_t2i)


@torch.no_grad()
def rerank_fast(
    model: BlipRetrieval,
    sims: torch.Tensor,
    image_tokens: torch.Tensor,
    image_offset: int,
    text_ids: torch.Tensor,
    text_atts: torch.Tensor,
    k_test: int,
    itm_batch_size: int,
    device: torch.device,
    config: dict,
    show_progress: bool = False,
    also_score: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the union of both directions' top-k pairs once, grouped by image, with cached image K/V; the score
    is `config["rerank_score"]` (see `rerank_score`). `also_score` (a second score mode) appends that score's two
    matrices, from the same ITM forwards.

    `image_tokens` holds this rank's images [image_offset, image_offset + len), on the device or in host memory
    (then streamed KV_CHUNK images at a time).
    """
    pairs = TopKPairs.of(sims, k_test)
    pair_keys, pair_img, pair_txt = pairs.keys, pairs.image, pairs.text
    pair_logits = torch.zeros(len(pair_keys), 2, device=device)

    # Within each image, score its texts shortest first, so that a batch padded to its longest text carries
    # little padding. The order is computed on the host, so the loop below never waits for the device.
    lengths = text_atts.sum(dim=1).cpu()
    pair_txt_host = pair_txt.cpu()
    length_order = torch.argsort(pair_img.cpu() * (int(lengths.max()) + 1) + lengths[pair_txt_host], stable=True)
    pair_txt_host = pair_txt_host[length_order]
    length_order = length_order.to(device)
    pair_txt_sorted = pair_txt[length_order]
    sorted_logits = torch.zeros(len(pair_keys), 2, device=device)
    first = int(torch.searchsorted(pair_img, torch.tensor(image_offset, device=device)))
    last = int(torch.searchsorted(pair_img, torch.tensor(image_offset + len(image_tokens), device=device)))
    counts = torch.bincount(pair_img[first:last] - image_offset, minlength=len(image_tokens)).tolist()
    plan = plan_itm_forwards(
        counts, lengths[pair_txt_host[first:last]].tolist(), itm_batch_size, ITM_PIECE.get(device.type)
    )
    progress = tqdm(total=last - first, desc="ITM pairs", disable=not show_progress)
    with eval_autocast(device, config):  # one autocast region: weights are cast to bf16 once, not per forward
        for chunk, forwards in enumerate(plan):
            chunk_tokens = image_tokens[chunk * KV_CHUNK : (chunk + 1) * KV_CHUNK].to(device, non_blocking=True)
            chunk_kv = model.text_encoder.cross_attention_kv(chunk_tokens)
            # Every index of the chunk goes to the device in one asynchronous copy; the loop never waits for it.
            rows, images, real = _to_device(
                [
                    [first + r for f in forwards for r in f.rows],
                    [i for f in forwards for i in f.images],
                    [r for f in forwards for r in f.real],
                ],
                device,
            )
            at_row = at_image = at_real = 0
            for f in forwards:
                f_rows = rows[at_row : at_row + len(f.rows)]
                f_real = real[at_real : at_real + len(f.real)]
                if len(f.images) == 1:  # one image: its keys/values as a view, no gather
                    image_kv = [
                        (k[f.images[0] : f.images[0] + 1], v[f.images[0] : f.images[0] + 1]) for k, v in chunk_kv
                    ]
                else:
                    f_images = images[at_image : at_image + len(f.images)]
                    image_kv = [(k[f_images], v[f_images]) for k, v in chunk_kv]
                texts = pair_txt_sorted[f_rows]
                ids, atts = text_ids[texts, : f.max_len], text_atts[texts, : f.max_len]  # pad to the longest, not 35
                sorted_logits[f_rows[f_real]] = model.itm_logits(ids, atts, image_kv=image_kv)[f_real]
                at_row, at_image, at_real = at_row + len(f.rows), at_image + len(f.images), at_real + len(f.real)
                progress.update(len(f.real))
    progress.close()
    pair_logits[length_order] = sorted_logits
    all_reduce_sum_(pair_logits)  # each pair was scored by the rank that owns its image
    modes = (config["rerank_score"], *([also_score] if also_score else []))
    return pairs.score_matrices(sims, pair_logits, modes, float(model.temp.detach()))


@torch.no_grad()
def rerank_blip2(
    model: Blip2Retrieval,
    sims: torch.Tensor,
    image_tokens: torch.Tensor,
    image_offset: int,
    text_ids: torch.Tensor,
    text_atts: torch.Tensor,
    k_test: int,
    itm_batch_size: int,
    device: torch.device,
    config: dict,
    show_progress: bool = False,
    also_score: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """BLIP-2's fast re-ranking: the same scores as `rerank_official` (LAVIS's compute_sim_matrix), with each pair of
    the union of both directions' top k scored once, by the rank that holds its image (`image_tokens` are this rank's
    images [image_offset, image_offset + len)), in batches of up to `itm_batch_size` pairs of similar text length
    padded to their longest. The queries cross-attend to the image in every second layer only, so there is no
    key/value cache as in `rerank_fast`: each pair carries its image's tokens. Returns what `rerank_fast` returns.
    """
    pairs = TopKPairs.of(sims, k_test)
    pair_logits = torch.zeros(len(pairs.keys), 2, device=device)
    mine = ((pairs.image >= image_offset) & (pairs.image < image_offset + len(image_tokens))).nonzero().flatten()
    lengths = text_atts.sum(dim=1)
    mine = mine[torch.argsort(lengths[pairs.text[mine]], stable=True)]  # shortest texts first: little padding
    mine_lengths = lengths[pairs.text[mine]].cpu().tolist()
    batches = length_batches(mine_lengths, itm_batch_size)
    with eval_autocast(device, config):
        for start, end in tqdm(batches, desc="ITM pairs", disable=not show_progress):
            rows, max_len = mine[start:end], mine_lengths[end - 1]
            texts = pairs.text[rows]
            images = (pairs.image[rows] - image_offset).to(image_tokens.device)
            tokens = image_tokens[images].to(device, non_blocking=True)
            pair_logits[rows] = model.itm_logits(text_ids[texts, :max_len], text_atts[texts, :max_len], tokens)
    all_reduce_sum_(pair_logits)  # each pair was scored by the rank that holds its image
    modes = (config["rerank_score"], *([also_score] if also_score else []))
    return pairs.score_matrices(sims, pair_logits, modes, float(model.temp.detach()))


@torch.no_grad()
def itm_match_one_text(
    model: BlipRetrieval,
    enc_ids: torch.Tensor,
    atts: torch.Tensor,
    image_tokens: torch.Tensor,
    device: torch.device,
    config: dict,
) -> torch.Tensor:
    """ITM logits (K, 2) of one text (ids starting with [ENC], (1, L), cut to its length) against K images.

    The fast path for one query (the search index): the images' cross-attention keys/values are projected
    KV_CHUNK images at a time, which bounds their memory (about 20 MB per image for ViT-B at 384 px in bf16),
    and the text is broadcast over them, one row per image, without copies.
    """
    logits = []
    with eval_autocast(device, config):
        for start in range(0, len(image_tokens), KV_CHUNK):
            tokens = image_tokens[start : start + KV_CHUNK].to(device, non_blocking=True)
            kv = model.text_encoder.cross_attention_kv(tokens)
            n = len(tokens)
            logits.append(model.itm_logits(enc_ids.expand(n, -1), atts.expand(n, -1), image_kv=kv))
    return torch.cat(logits) if logits else torch.zeros(0, 2, device=device)

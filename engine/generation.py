"""Caption generation: beam search, greedy and nucleus sampling, batched, with cached keys/values.

The semantics are those of transformers' `generate` (pinned by tests/test_caption_generation.py against
`BlipForConditionalGeneration.generate` on the same weights), which is what the official BLIP code called:
- lengths count every token, [DEC] and the prompt included (`max_length` 20, `min_length` 5 by default);
- [SEP] ends a caption and is forbidden while the sequence is shorter than `min_length`;
- the repetition penalty divides positive and multiplies negative scores of every token already in the sequence
  (prompt included); beam search applies it to log-probabilities, greedy and sampling to logits;
- beam search keeps `num_beams` running beams, scores finished ones by sum of log-probs / generated
  length ** length_penalty (generated tokens including the final [SEP]), and stops once no running beam can beat
  the worst finished one (transformers' default heuristic, `early_stopping=False`);
- sampling filters with top-k (50) then top-p (0.9) and draws with `torch.multinomial`, so with the same seed it
  draws the same tokens as transformers.
Beyond transformers: each image's cross-attention keys/values are projected once per generation and shared by its
beams (transformers projects them at the first step and copies them per beam), and the prompt is encoded once
per image before its beams are spread.

One deliberate difference from the official numbers' environment: BLIP ran transformers 4.15, whose beam search
divided by the full length (prompt included, final [SEP] excluded). Current transformers, and this module, divide
by the generated length; the choice of the best finished beam can differ between the two (docs/captioning.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class GenerationSettings:
    """How to generate; `from_config` reads the captioning config keys."""

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    sample: bool = False
    top_p: float = 0.9
    top_k: int = 50
    length_penalty: float = 1.0  # transformers' default; not a config key (the official code never sets it)

    @classmethod
    def from_config(cls, config: dict) -> GenerationSettings:
        sample = config["sample"]
        return cls(
            num_beams=1 if sample else config["num_beams"],
            max_length=config["gen_max_length"],
            min_length=config["gen_min_length"],
            repetition_penalty=config["sample_repetition_penalty"] if sample else config["repetition_penalty"],
            sample=sample,
            top_p=config["top_p"],
            top_k=config["top_k"],
        )


class _Decoder:
    """Next-token logits for a growing batch of sequences, with or without the self-attention cache.

    Rows [g*m, (g+1)*m) belong to image g. With the cache, each step feeds only the newest token; without it
    (the reference path for tests), each step re-runs the decoder over the whole sequence.
    """

    def __init__(self, model, image_embeds: torch.Tensor, rows_per_image: int, use_cache: bool):
        self.model = model
        self.use_cache = use_cache
        self.rows_per_image = rows_per_image
        if use_cache:
            self.image_kv = model.image_kv(image_embeds)  # once per image, shared by its rows
        else:
            self.image_embeds = image_embeds.repeat_interleave(rows_per_image, dim=0)
        self.past = None

    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Logits after the prompt (G, P) for every row: the prompt is encoded once per image, then repeated."""
        if not self.use_cache:
            return self._full(prompt.repeat_interleave(self.rows_per_image, dim=0))
        logits, past = self.model.decode_step(prompt, None, self.image_kv)
        m = self.rows_per_image
        self.past = [(k.repeat_interleave(m, dim=0), v.repeat_interleave(m, dim=0)) for k, v in past]
        return logits.repeat_interleave(m, dim=0)

    def step(self, sequences: torch.Tensor, origin: torch.Tensor | None = None) -> torch.Tensor:
        """Logits after `sequences` (N, L), whose rows continue rows `origin` of the previous step (beam search)."""
        if not self.use_cache:
            return self._full(sequences)
        if origin is not None:
            self.past = [(k.index_select(0, origin), v.index_select(0, origin)) for k, v in self.past]
        logits, self.past = self.model.decode_step(sequences[:, -1:], self.past, self.image_kv)
        return logits

    def _full(self, sequences: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(sequences)
        logits, _ = self.model.text_decoder(sequences, mask, self.image_embeds)
        return logits[:, -1]


def _repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def _process(scores: torch.Tensor, sequences: torch.Tensor, settings: GenerationSettings, eos: int) -> torch.Tensor:
    """The repetition penalty, then [SEP] forbidden below min_length."""
    scores = _repetition_penalty(scores, sequences, settings.repetition_penalty)
    if sequences.shape[1] < settings.min_length:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k best tokens, then the smallest set whose probability reaches top_p (at least one)."""
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -float("inf"))
    return scores


def _greedy_or_sample(decoder: _Decoder, prompt: torch.Tensor, settings: GenerationSettings, eos: int, pad: int):
    sequences = prompt
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = decoder.start(prompt)
    while True:
        scores = _process(logits.float(), sequences, settings, eos)
        if settings.sample:
            probs = F.softmax(_top_k_top_p(scores, settings.top_k, settings.top_p), dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        unfinished &= tokens != eos
        if sequences.shape[1] >= settings.max_length or not bool(unfinished.any()):
            return sequences
        logits = decoder.step(sequences)


def _beam_search(decoder: _Decoder, prompt: torch.Tensor, settings: GenerationSettings, eos: int, pad: int):
    """Batched beam search over G images x K beams; returns the best finished sequence per image."""
    images, prompt_len = prompt.shape
    beams, max_len, device = settings.num_beams, settings.max_length, prompt.device
    neg = -1.0e9
    running = torch.full((images, beams, max_len), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt[:, None]
    running_scores = torch.zeros(images, beams, device=device)
    running_scores[:, 1:] = neg  # all beams start identical: only the first may expand at the first step
    finished = running.clone()
    finished_scores = torch.full((images, beams), neg, device=device)
    finished_flag = torch.zeros(images, beams, dtype=torch.bool, device=device)
    finished_gen_len = torch.zeros(images, beams, dtype=torch.long, device=device)
    can_improve = torch.ones(images, 1, dtype=torch.bool, device=device)
    in_top_beams = torch.arange(2 * beams, device=device) < beams  # only the K best candidates may finish
    row_offset = torch.arange(images, device=device)[:, None] * beams

    cur = prompt_len
    logits = decoder.start(prompt)
    while True:
        flat = running[:, :, :cur].reshape(images * beams, cur)
        log_probs = _process(F.log_softmax(logits.float(), dim=-1), flat, settings, eos)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(images, beams, vocab) + running_scores[:, :, None]).view(images, beams * vocab)
        cand_scores, cand_index = torch.topk(totals, 2 * beams)  # (G, 2K)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        candidates = running.gather(1, cand_beam[:, :, None].expand(-1, -1, max_len)).clone()
        candidates[:, :, cur] = cand_token
        ends = (cand_token == eos) | (cur + 1 >= max_len)

        # Running beams: the K best candidates that did not end.
        keep_scores, keep = torch.topk(cand_scores + ends.float() * neg, beams)
        running = candidates.gather(1, keep[:, :, None].expand(-1, -1, max_len))
        running_scores = keep_scores
        origin = (cand_beam.gather(1, keep) + row_offset).view(-1)

        # Finished: candidates among the K best that ended, scored by sum log-prob / generated length ** penalty.
        normalised = cand_scores / float(cur + 1 - prompt_len) ** settings.length_penalty
        normalised = normalised + (~can_improve).float() * neg + (~(ends & in_top_beams)).float() * neg
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_len))
        finished_scores = merged_scores.gather(1, best)
        finished_flag = torch.cat([finished_flag, ends & in_top_beams], dim=1).gather(1, best)
        generated = torch.full_like(cand_token, cur + 1 - prompt_len)
        finished_gen_len = torch.cat([finished_gen_len, generated], dim=1).gather(1, best)

        cur += 1
        # Stop when no running beam can still beat the worst finished one (transformers' heuristic).
        best_running = running_scores[:, :1] / float(cur - prompt_len) ** settings.length_penalty
        worst_finished = torch.where(finished_flag, finished_scores.min(dim=1, keepdim=True).values, neg)
        can_improve &= (best_running > worst_finished).any(dim=1, keepdim=True)
        if not bool(can_improve.any()) or bool(ends.all()):
            break
        logits = decoder.step(running[:, :, :cur].reshape(images * beams, cur), origin)

    # Buffers start as padding and a finished beam is copied when it ends, so padding follows every [SEP].
    length = prompt_len + int(finished_gen_len[:, 0].max())
    best_sequences = finished[:, 0, :length]
    return best_sequences


@torch.no_grad()
def generate(
    model, images: torch.Tensor, settings: GenerationSettings, use_cache: bool = True, image_embeds=None
) -> torch.Tensor:
    """Token ids (B, L) of one caption per image: [DEC], the prompt, the generated tokens, [SEP], then padding.

    `model`: a BlipCaption (anything with encode_image, image_kv, decode_step, text_decoder, prompt_ids and the
    token ids). `use_cache=False` recomputes every position at every step (the reference for tests).
    """
    if settings.max_length <= model.prompt_length:
        raise ValueError(
            f"gen_max_length {settings.max_length} leaves no room after the prompt {model.prompt!r} "
            f"({model.prompt_length} tokens with [DEC]); raise gen_max_length"
        )
    if image_embeds is None:
        image_embeds = model.encode_image(images)
    prompt = model.prompt_ids(image_embeds.shape[0], image_embeds.device)
    eos, pad = model.eos_token_id, model.pad_token_id
    if settings.sample or settings.num_beams == 1:
        return _greedy_or_sample(_Decoder(model, image_embeds, 1, use_cache), prompt, settings, eos, pad)
    decoder = _Decoder(model, image_embeds, settings.num_beams, use_cache)
    return _beam_search(decoder, prompt, settings, eos, pad)

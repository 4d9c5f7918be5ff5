"""The training losses of BlipRetrieval.forward against direct, loop-based recomputations.

Spec: the official BLIP_Retrieval.forward (ITC with idx-aware targets, queues and momentum distillation; ITM
with hard negatives). Each reference below is written from the spec with explicit loops
over rows and columns (float64), sharing nothing with the model's vectorised code except the encoders.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.blip_retrieval as br
import utils
from configs import schema
from engine.retrieval_task import itm_hard_fraction
from models.blip_retrieval import sample_hard_negatives
from tests.helpers import TINY_MED, tiny_model

CAPTIONS = [
    "a dog runs on the grass",
    "a red ball",
    "two cats sit in the street",
    "a man with a blue ball",
    "the woman sits",
    "a photo of a cat",
]
# Repeated image ids in the batch (0 twice, 2 twice), as with several captions of one image.
IDX = torch.tensor([0, 5, 0, 2, 7, 2])
QUEUE = 18  # a multiple of the batch of 6: the queue is written in whole batches


def _model(tmp_path, **overrides):
    torch.manual_seed(0)
    med = {**TINY_MED, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = tiny_model(tmp_path, med_config=med, queue_size=QUEUE, **overrides)
    model.eval()  # no dropout: the reference and the model must see identical activations
    return model


def _inputs(batch: int = len(CAPTIONS)) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=gen), CAPTIONS[:batch], IDX[:batch].clone()


def _plant_queue(model) -> None:
    """Fill the queue with unit vectors and plant ids that match batch items (and some that match nothing)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.image_queue.copy_(F.normalize(torch.randn(model.image_queue.shape, generator=gen), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn(model.text_queue.shape, generator=gen), dim=0))
        model.idx_queue.fill_(-100)
        model.idx_queue[0, 3] = 0  # positive for batch rows 0 and 2
        model.idx_queue[0, 14] = 0
        model.idx_queue[0, 16] = 7  # positive for row 4
        model.idx_queue[0, 13] = 99  # an id absent from the batch
        model.ptr_queue.fill_(6)


def _momentum_copy(model):
    """A copy of the model with theta_m <- m * theta_m + (1 - m) * theta applied parameter by parameter."""
    ref = copy.deepcopy(model)
    names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    with torch.no_grad():
        for name in names:
            main = dict(getattr(ref, name).named_parameters())
            for pname, p_m in getattr(ref, name + "_m").named_parameters():
                p_m.copy_(ref.momentum * p_m + (1 - ref.momentum) * main[pname])
    return ref


def _reference_ita(model, image, caption, idx, alpha):
    """loss_ita, momentum features, from the spec with loops. Uses the queue as it is BEFORE the forward."""
    ref = _momentum_copy(model)
    temp = min(max(ref.temp.item(), 0.001), 0.5)
    with torch.no_grad():
        ids, atts = ref.tokenize(caption)
        img = F.normalize(ref.vision_proj(ref.visual_encoder(image)[:, 0]), dim=-1).double()
        txt = F.normalize(ref.text_proj(ref.text_encoder(ids, atts, mode="text")[:, 0]), dim=-1).double()
        img_m = F.normalize(ref.vision_proj_m(ref.visual_encoder_m(image)[:, 0]), dim=-1).double()
        txt_m = F.normalize(ref.text_proj_m(ref.text_encoder_m(ids, atts, mode="text")[:, 0]), dim=-1).double()
    # Candidate columns: the batch's momentum features, then every queue slot.
    img_cols = [img_m[j] for j in range(len(caption))] + [ref.image_queue[:, q].double() for q in range(QUEUE)]
    txt_cols = [txt_m[j] for j in range(len(caption))] + [ref.text_queue[:, q].double() for q in range(QUEUE)]
    col_ids = [int(i) for i in idx] + [int(ref.idx_queue[0, q]) for q in range(QUEUE)]

    def direction_loss(queries, queries_m, columns):
        total = 0.0
        for i in range(len(caption)):
            positives = [j for j, c in enumerate(col_ids) if c == int(idx[i])]
            hard = [1.0 / len(positives) if j in positives else 0.0 for j in range(len(col_ids))]
            logits_m = [float(queries_m[i] @ col) / temp for col in columns]
            z_m = sum(math.exp(v - max(logits_m)) for v in logits_m)
            soft = [math.exp(v - max(logits_m)) / z_m for v in logits_m]
            target = [alpha * s + (1 - alpha) * h for s, h in zip(soft, hard)]
            logits = [float(queries[i] @ col) / temp for col in columns]
            log_z = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
            total += -sum(t * (v - log_z) for t, v in zip(target, logits))
        return total / len(caption)

    loss = (direction_loss(img, img_m, txt_cols) + direction_loss(txt, txt_m, img_cols)) / 2
    return loss, img_m.float(), txt_m.float()


def test_loss_ita_matches_loop_reference_with_repeated_ids_queue_positives_alpha_and_clamp(tmp_path):
    model = _model(tmp_path)
    _plant_queue(model)
    with torch.no_grad():
        model.temp.fill_(0.9)  # above the 0.5 ceiling: the forward must clamp before using it
    image, caption, idx = _inputs()
    alpha = 0.3
    expected, img_m, txt_m = _reference_ita(model, image, caption, idx, alpha)
    queue_before = model.image_queue.clone(), model.text_queue.clone()

    out = model(image, caption, alpha, idx)

    assert model.temp.item() == pytest.approx(0.5)
    assert out["loss_ita"].item() == pytest.approx(expected, abs=1e-5)
    # Queue write: columns [6, 6 + B) hold this batch's momentum features and ids; the pointer advanced by B.
    batch = len(caption)
    assert int(model.ptr_queue) == 6 + batch
    torch.testing.assert_close(model.image_queue[:, 6 : 6 + batch], img_m.t(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.text_queue[:, 6 : 6 + batch], txt_m.t(), atol=1e-6, rtol=0)
    assert torch.equal(model.idx_queue[0, 6 : 6 + batch], idx)
    untouched = torch.ones(QUEUE, dtype=torch.bool)
    untouched[6 : 6 + batch] = False
    assert torch.equal(model.image_queue[:, untouched], queue_before[0][:, untouched])
    assert torch.equal(model.text_queue[:, untouched], queue_before[1][:, untouched])


def test_current_batch_is_not_in_the_queue_during_its_own_loss(tmp_path):
    # If the batch were enqueued before its loss, its own features would also appear as queue positives.
    model = _model(tmp_path)
    _plant_queue(model)
    image, caption, idx = _inputs()
    after = copy.deepcopy(model)
    with torch.no_grad():
        after(image, caption, 0.4, idx)  # a model whose queue already holds this batch
    after.load_state_dict(
        {
            **model.state_dict(),
            "image_queue": after.image_queue,
            "text_queue": after.text_queue,
            "idx_queue": after.idx_queue,
        }
    )
    wrong, _, _ = _reference_ita(after, image, caption, idx, 0.4)
    right, _, _ = _reference_ita(model, image, caption, idx, 0.4)
    got = model(image, caption, 0.4, idx)["loss_ita"].item()
    assert got == pytest.approx(right, abs=1e-5)
    assert abs(got - wrong) > 1e-3


def test_queue_pointer_wraps_to_zero(tmp_path):
    model = _model(tmp_path)
    image, caption, idx = _inputs()
    with torch.no_grad():
        for step in range(QUEUE // 6):
            assert int(model.ptr_queue) == 6 * step
            model(image, caption, 0.4, idx)
    assert int(model.ptr_queue) == 0
    assert torch.equal(model.idx_queue[0], idx.repeat(QUEUE // 6))


def test_loss_itm_with_fixed_negatives_matches_pairwise_reference(tmp_path, monkeypatch):
    model = _model(tmp_path)
    image, caption, idx = _inputs()
    neg_image = torch.tensor([1, 2, 4, 0, 3, 0])  # sampled for each text
    neg_text = torch.tensor([3, 0, 5, 4, 1, 2])  # sampled for each image
    draws = iter([neg_image, neg_text])  # forward samples t2i (images) first, then i2t (texts)
    monkeypatch.setattr(
        br, "sample_hard_negatives", lambda sim, pos, hard_fraction, floor=0.0: (next(draws), torch.tensor(0))
    )
    ref = _momentum_copy(model)

    out = model(image, caption, 0.4, idx)

    with torch.no_grad():
        embeds = ref.visual_encoder(image)
        ids, atts = ref.tokenize(caption)
        ids[:, 0] = ref.tokenizer.convert_tokens_to_ids("[ENC]")  # every ITM call reads the [ENC] position

        def match_logits(t: int, i: int) -> torch.Tensor:  # one (text t, image i) pair at a time
            hidden = ref.text_encoder(ids[t : t + 1], atts[t : t + 1], encoder_hidden_states=embeds[i : i + 1])
            return ref.itm_head(hidden[:, 0])[0].double()

        terms, called_match = [], {"pos": [], "neg": []}
        for b in range(len(caption)):
            pairs = (("pos", b, b, 1), ("neg", b, int(neg_image[b]), 0), ("neg", int(neg_text[b]), b, 0))
            for kind, t, i, label in pairs:  # true pair; text b with its negative image; negative text, image b
                logits = match_logits(t, i)
                terms.append(-F.log_softmax(logits, 0)[label])
                called_match[kind].append(float(logits[1] > logits[0]))
    assert out["loss_itm"].item() == pytest.approx(float(sum(terms) / len(terms)), abs=1e-5)
    # The logged ITM accuracies: matches called on the positives, mismatches called on the negatives.
    assert out["itm_acc_pos"].item() == pytest.approx(np.mean(called_match["pos"]))
    assert out["itm_acc_neg"].item() == pytest.approx(1 - np.mean(called_match["neg"]))


# ----------------------------------------------------------------------------- hard-negative sampling


def _assert_negatives(choice: torch.Tensor, positive: torch.Tensor) -> None:
    has_negative = (~positive).any(dim=1)
    chosen_positive = positive[torch.arange(len(choice)), choice]
    assert not chosen_positive[has_negative].any()


def test_sampler_never_returns_a_positive_local_mask():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positive = idx[:, None] == idx[None, :]
    # Positives get the largest similarities, so an unmasked sampler would pick them almost always.
    sim = torch.randn(8, 8) + 8.0 * positive.float()
    for _ in range(200):
        choice, fallback = sample_hard_negatives(sim, positive)
        _assert_negatives(choice, positive)
        assert int(fallback) == 0


def test_sampler_never_returns_a_positive_gathered_mask():
    torch.manual_seed(0)
    local = torch.tensor([0, 3, 3, 5])
    world = torch.cat([local, torch.tensor([3, 5, 9, 0])])  # another rank's batch shares ids 0, 3, 5
    positive = local[:, None] == world[None, :]
    sim = torch.randn(4, 8) + 8.0 * positive.float()
    draws = torch.stack([sample_hard_negatives(sim, positive)[0] for _ in range(500)])
    for row in range(4):
        assert not positive[row, draws[:, row]].any()
    assert set(draws[:, 0].tolist()) == {1, 2, 3, 4, 5, 6}  # every negative is reachable, no positive


def test_sampler_survives_all_positive_nan_and_underflow_rows_and_counts_fallbacks():
    torch.manual_seed(0)
    positive = torch.zeros(4, 5, dtype=torch.bool)
    positive[0] = True  # every candidate shares the image: no negative exists
    positive[1, :2] = True
    positive[2, 0] = True
    sim = torch.zeros(4, 5)
    sim[1] = float("nan")  # a NaN row
    sim[2, 1:] = -1e4  # negatives underflow to weight 0 next to the positive at 0
    sim[3] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])  # a normal row
    for _ in range(100):
        choice, fallback = sample_hard_negatives(sim, positive)
        assert int(fallback) == 3
        assert ((choice >= 0) & (choice < 5)).all()
        _assert_negatives(choice, positive)


def test_hard_fraction_one_is_the_official_draw_bit_for_bit():
    """The default (official) sampler: multinomial over the masked softmax, the same draws from the same RNG."""
    gen_sim = torch.Generator().manual_seed(3)
    sim = torch.randn(16, 16, generator=gen_sim) * 4
    idx = torch.arange(16) // 2
    positive = idx[:, None] == idx[None, :]
    torch.manual_seed(11)
    ours = sample_hard_negatives(sim, positive)[0]
    torch.manual_seed(11)
    official = torch.multinomial(F.softmax(sim, dim=1).masked_fill(positive, 0.0), 1).squeeze(1)
    assert torch.equal(ours, official)


@pytest.mark.parametrize("hard_fraction", [0.0, 0.5])
def test_hard_fraction_mixes_uniform_and_hard_negatives(hard_fraction):
    """hard_fraction h draws from h x softmax + (1 - h) x uniform over the other images' candidates."""
    torch.manual_seed(0)
    positive = torch.zeros(1, 5, dtype=torch.bool)
    positive[0, 0] = True
    sim = torch.tensor([[9.0, 4.0, 0.0, 0.0, 0.0]])  # the hard sampler picks candidate 1 ~95% of the time
    hard = F.softmax(sim, dim=1).masked_fill(positive, 0.0)
    hard = hard / hard.sum()
    uniform = (~positive).float() / 4
    expected = (hard_fraction * hard + (1 - hard_fraction) * uniform)[0]
    draws = 20000
    counts = torch.bincount(
        torch.stack(
            [sample_hard_negatives(sim.expand(draws, -1), positive.expand(draws, -1), hard_fraction)[0]]
        ).flatten(),
        minlength=5,
    )
    assert counts[0] == 0  # never the positive
    std = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((counts / draws - expected).abs() <= 5 * std + 1e-9), (counts / draws, expected)


def test_uniform_negatives_count_no_fallback_rows():
    positive = torch.eye(4, dtype=torch.bool)
    sim = torch.full((4, 4), float("nan"))  # hard weights unusable, but uniform negatives do not need them
    choice, fallback = sample_hard_negatives(sim, positive, hard_fraction=0.0)
    assert int(fallback) == 0
    _assert_negatives(choice, positive)


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        ("hard", 0, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("uniform", 0, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        ("warmup", 3, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]),  # steps 0, 1, 2 uniform; hard from step 3 on
        ("anneal", 4, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
    ],
)
def test_itm_negative_schedule_switches_at_the_right_step(schedule, steps, expected):
    assert [itm_hard_fraction(step, schedule, steps) for step in range(6)] == expected


def test_official_hard_negatives_are_the_default_and_in_every_paper_config():
    """The official sampler, augmentation and re-ranking score are the defaults and what every paper config
    gets; the demo departs from all three (docs/notes/itm_from_scratch.md)."""
    official = {"itm_negatives": "hard", "train_augment": "official", "rerank_score": "official"}
    assert {key: schema.DEFAULT_CONFIG[key] for key in official} == official
    for name in ("retrieval_flickr", "retrieval_coco", "retrieval_flickr_large", "retrieval_coco_large"):
        config = schema.load_config(f"configs/{name}.yaml")
        assert {key: config[key] for key in official} == official, name
    demo = schema.load_config("configs/demo.yaml")
    assert {key: demo[key] for key in official} == {
        "itm_negatives": "uniform",
        "train_augment": "none",
        "rerank_score": "calibrated",
    }


def test_warmup_and_anneal_need_a_step_count():
    with pytest.raises(utils.ConfigError, match="itm_negatives_steps.*'warmup'"):
        schema.validate_config({**schema.DEFAULT_CONFIG, "itm_negatives": "warmup"}, "test")


def test_negative_all_rank_in_one_process_equals_local_mode(tmp_path):
    local = _model(tmp_path)
    everywhere = copy.deepcopy(local)
    everywhere.negative_all_rank = True
    image, caption, idx = _inputs()
    torch.manual_seed(5)
    out_local = local(image, caption, 0.4, idx)
    torch.manual_seed(5)
    out_all = everywhere(image, caption, 0.4, idx)
    for key in ("loss_ita", "loss_itm", "num_neg_fallback"):
        assert torch.equal(out_local[key], out_all[key]), key


def test_trimmed_text_compute_gives_the_official_losses_and_gradients(tmp_path):
    """Padding to the longest caption and the [CLS]-only last layer (default), the same with max_length padding
    (`static`, for torch.compile), and the official max_length padding with the full last layer: same losses and
    gradients, so the trimming is pure speed."""
    trimmed = _model(tmp_path)
    models = {mode: copy.deepcopy(trimmed) for mode in ("static", "official")}
    models["trimmed"] = trimmed
    image, caption, idx = _inputs()
    grads = []
    for mode in ("trimmed", "static", "official"):
        model = models[mode]
        torch.manual_seed(5)  # the same hard negatives
        out = model(image, caption, 0.4, idx, text_compute=mode)
        (out["loss_ita"] + out["loss_itm"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["losses"] = torch.stack([out["loss_ita"], out["loss_itm"]]).detach()
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for name in grads[0]:
            assert torch.allclose(grads[0][name], other[name], atol=1e-5, rtol=1e-4), name


# ----------------------------------------------------------------------------- momentum and temperature


def test_momentum_update_formula(tmp_path):
    model = _model(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # main and momentum weights now differ
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model._momentum_update()
    after = dict(model.named_parameters())
    momentum_prefixes = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
    checked = 0
    for name, value in before.items():
        if name.startswith(momentum_prefixes):
            main = before[name.replace("_m.", ".", 1)]
            torch.testing.assert_close(after[name], 0.995 * value + 0.005 * main, atol=1e-6, rtol=0)
            checked += 1
        else:
            assert torch.equal(after[name], value), name  # main weights and temp are untouched
    assert checked == sum(1 for n in before if n.startswith(momentum_prefixes)) > 0
    assert checked == sum(1 for m, _ in model.model_pairs for _ in m.parameters())  # every pair updated
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name  # queues are not part of the EMA


@pytest.mark.parametrize(("value", "clamped"), [(1e-5, 0.001), (0.9, 0.5), (0.07, 0.07)])
def test_temp_is_clamped_in_the_forward(tmp_path, value, clamped):
    model = _model(tmp_path)
    with torch.no_grad():
        model.temp.fill_(value)
    image, caption, idx = _inputs()
    out = model(image, caption, 0.4, idx)
    assert model.temp.item() == pytest.approx(clamped)
    assert torch.isfinite(out["loss_ita"]) and torch.isfinite(out["loss_itm"])


def test_update_queues_false_leaves_the_queues_unwritten(tmp_path):
    model = _model(tmp_path)
    image, caption, idx = _inputs()
    queues = {name: buf.clone() for name, buf in model.named_buffers()}
    with torch.no_grad():
        model(image, caption, 0.4, idx, update_queues=False)
    assert all(torch.equal(queues[name], buf) for name, buf in model.named_buffers())
    with torch.no_grad():
        model(image, caption, 0.4, idx)
    assert not torch.equal(queues["image_queue"], model.image_queue) and int(model.ptr_queue) == 6


def test_unknown_text_compute_is_refused(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(ValueError, match="text_compute must be one of"):
        model(*_inputs()[:1], CAPTIONS, 0.4, IDX, text_compute="fast")

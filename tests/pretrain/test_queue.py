"""The negative queue (loss.queue_batches): earlier batches' items join the softmax as negatives, logQ-corrected,
copies of the target masked, without gradient; the model fills it from training batches only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_model import config

from pretrain.losses import ExtraNegatives, NegativeQueue, sampled_softmax
from pretrain.model import Catalog, Recommender
from shards.stream import SequenceStream


def test_extra_negatives_join_the_softmax_with_logq_and_the_target_copies_masked() -> None:
    torch.manual_seed(0)
    user_ND, items_UD, extra_QD = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4)
    ids_U, ids_Q = torch.tensor([10, 11, 12, 13, 14]), torch.tensor([20, 11, 21])  # 11: a copy of target 1
    log_q_U, log_q_Q = torch.randn(5), torch.randn(3)
    target_N = torch.tensor([0, 1, 4])
    extra = ExtraNegatives(extra_QD, ids_Q, log_q_Q)
    loss = sampled_softmax(user_ND, items_UD, target_N, temperature=0.5, log_q_U=log_q_U, item_ids_U=ids_U,
                           extra=extra)  # fmt: skip
    logits_NG = user_ND @ torch.cat([items_UD, extra_QD]).T / 0.5 - torch.cat([log_q_U, log_q_Q])
    logits_NG[1, 6] = -math.inf  # the queued copy of item 11 is no negative of the user whose target it is
    assert loss == pytest.approx(F.cross_entropy(logits_NG, target_N).item(), rel=1e-6)
    with pytest.raises(ValueError, match="logQ"):
        sampled_softmax(user_ND, items_UD, target_N, temperature=0.5, item_ids_U=ids_U, extra=extra)


def test_the_queue_keeps_the_last_batches_detached_and_skips_current_items() -> None:
    queue = NegativeQueue(2)
    assert queue.negatives(torch.tensor([1])) is None
    for start in (0, 10, 20):  # the first batch falls out
        items = torch.randn(3, 4, requires_grad=True)
        queue.push(items * 2, torch.arange(start, start + 3), None)
    got = queue.negatives(torch.tensor([11, 99]))
    assert got is not None and got.item_ids_Q.tolist() == [10, 12, 20, 21, 22] and got.log_q_Q is None
    assert not got.items_QD.requires_grad and got.items_QD.grad_fn is None


def test_the_model_fills_the_queue_while_training_and_uses_it_at_the_next_step(folders) -> None:
    cfg = config(folders, "loss.queue_batches=2", "loss.logq_correction=true")
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders)).train()
    stream = iter(SequenceStream(cfg.data.domains, cfg.data.stream, rank=0, world_size=1))
    first, second = next(stream), next(stream)
    plain = model(first).loss  # an empty queue: the in-batch softmax alone
    assert len(model.queue.entries) == 1 and torch.isfinite(plain)
    queued = model.queue.entries[0]
    assert not queued.items_QD.requires_grad and queued.log_q_Q is not None
    extra = model.queue.negatives(model.encode_items(second).rows_U)
    assert extra is not None and len(extra.item_ids_Q) > 0  # the first batch holds items the second does not
    with_queue = model(second).loss
    assert len(model.queue.entries) == 2
    model.queue.entries.clear()
    without = model(second).loss
    assert with_queue.item() > without.item()  # more negatives, the same positives: a harder softmax
    with_queue.backward()  # gradients reach the parameters, never the queue
    assert all(e.items_QD.grad is None and not e.items_QD.requires_grad for e in model.queue.entries)
    model.eval()
    model.queue.entries.clear()
    model(first)
    assert not model.queue.entries  # evaluation does not fill it

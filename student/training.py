"""The offline distillation loop: ``fit`` a student to the teacher's soft labels.

Per step, on a batch of ``B`` train queries (``TrainSet.forward``)::

    loss = alpha * ListwiseKD_T(student logits, teacher logits over each list)
         + (1 - alpha) * CE(student logits, hard labels)
         + embed_weight * (2 - mean cos(q_S, q_T) - mean cos(c_S, c_T))

plus, with ``extra`` queries (``student.extra``: code as queries, unlabeled text),
their embedding regression and pseudo-list KD terms; with ``ListwiseKDLoss`` and
``IPWClickLoss(eta=0)`` (plain listwise cross-entropy)
of ``student.losses``; with ``in_batch_negatives`` the CE ranks each query against
every distinct candidate of the batch, not only its own list. The last term matches
the teacher's embeddings of the batch's queries and candidates (for a student
without a candidate tower ``c_S`` *are* the teacher's, so only the query part moves).

AdamW with linear warm-up and cosine decay to 0. The run has an epoch *and* a
wall-clock budget: after the first epoch the plan shrinks to the epochs that fit
``time_budget_s``, and the schedule decays over that plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from codistill.config import DistillConfig
from codistill.ranking import RankingExample
from student.base import Student
from student.evaluation import evaluate_student
from student.extra import ExtraQueries, sample_rows
from student.losses import IPWClickLoss, ListwiseKDLoss
from student.trainset import TrainSet


def fit(
    student: Student, train_set: TrainSet, config: DistillConfig, *, progress: bool = False,
    valid: Sequence[RankingExample] | None = None, extra: ExtraQueries | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place on ``train_set`` under ``config``'s epoch and time budget.

    The only effect is on the student's parameters (and its train / eval mode, left
    in eval): no store, registry, file or global torch setting is touched. Batches
    are drawn with a generator of its own, seeded with ``config.seed``.

    Parameters
    ----------
    student : Student
        Any student; its batches go through ``Student.embed_tokenised``. A student
        without a candidate tower needs ``train_set.attach_candidate_embeddings``
        first, and so does ``config.embed_weight > 0`` (then the student's embedding
        size must be the teacher's).
    train_set : TrainSet
        Tokenised train lists with the teacher's logits, built with the student's
        tokenizer.
    config : DistillConfig
        ``epochs``, ``time_budget_s``, ``alpha``, ``temperature``, ``batch_size``,
        ``lr``, ``warmup_ratio``, ``weight_decay``, ``seed``, ``in_batch_negatives``,
        ``embed_weight`` and ``track_valid`` are read.
    progress : bool, default False
        Show a ``tqdm`` bar.
    valid : sequence of RankingExample, optional
        With ``config.track_valid``, evaluated after each epoch (logged in the
        history; it does not steer training).
    extra : ExtraQueries, optional
        Texts with teacher vectors for the query tower (``student.extra``); their
        pseudo-lists are drawn from ``train_set.teacher_candidates`` (attach them
        first). ``extra_batch``, ``extra_list``, ``extra_weight`` and
        ``extra_kd_weight`` are read.

    Returns
    -------
    dict
        ``epochs_run``, ``epochs_requested``, ``epochs_planned``, ``steps``,
        ``seconds``, ``stopped_by`` (``"epochs"`` or ``"time"``), ``queries_per_s``,
        ``student_scale`` and ``history``: one row per epoch with the mean ``loss``,
        ``kd``, ``ce``, ``embed`` and ``extra`` terms per query, ``queries``, ``seconds``, the
        last ``lr`` and, when tracked, ``valid_mrr@10``.

    References
    ----------
    .. [1] Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network".
       NIPS Deep Learning Workshop, 2015. https://arxiv.org/abs/1503.02531
    .. [2] Loshchilov, Hutter. "Decoupled Weight Decay Regularization". ICLR 2019.
       https://arxiv.org/abs/1711.05101
    """
    cfg, data = config, train_set
    if extra is not None and data.teacher_candidates is None:
        raise RuntimeError("extra queries need the teacher's candidate vectors: "
                           "attach_candidate_embeddings first")
    kd_fn, ce_fn = ListwiseKDLoss(cfg.temperature), IPWClickLoss(eta=0.0)  # eta 0: plain CE
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    plan = {"epochs": cfg.epochs}

    def lr_factor(step: int) -> float:  # warmup, then cosine to 0 over the *current* plan
        total = max(plan["epochs"] * steps_per_epoch, 1)
        warm = max(int(cfg.warmup_ratio * total), 1)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min((step - warm) / max(total - warm, 1), 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    stopped_by, step, total_seen = "epochs", 0, 0
    bar = tqdm(total=plan["epochs"] * steps_per_epoch, desc="distill", unit="step",
               disable=not progress)
    student.train()
    epoch = 0
    while epoch < plan["epochs"]:
        t_epoch = time.perf_counter()
        sums, seen = np.zeros(5), 0
        for batch in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            out = data.forward(student, batch)
            kd = kd_fn(out.logits, data.teacher_logits[batch], out.mask)
            if cfg.in_batch_negatives:
                ce = ce_fn(out.full, data.in_batch_labels(batch, out))
            else:
                ce = ce_fn(out.logits, data.labels[batch], mask=out.mask)
            loss = cfg.alpha * kd + (1.0 - cfg.alpha) * ce
            if cfg.embed_weight > 0:
                if data.teacher_candidates is None:
                    raise RuntimeError("embed_weight > 0: attach_candidate_embeddings first")
                match = (2.0 - (out.q * data.teacher_queries[batch]).sum(-1).mean()
                         - (out.c * data.teacher_candidates[out.unique]).sum(-1).mean())
                loss = loss + cfg.embed_weight * match
                sums[3] += float(match.detach()) * len(batch)
            if extra is not None and len(extra):
                pool = data.teacher_candidates[sample_rows(len(data.teacher_candidates),
                                                           cfg.extra_list, gen)]
                reg, xkd = extra.loss(student, sample_rows(len(extra), cfg.extra_batch, gen),
                                      pool, cfg)
                loss = loss + reg + xkd
                sums[4] += float((reg + xkd).detach()) * len(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(batch)
            sums[:3] += (float(loss.detach()) * len(batch), float(kd.detach()) * len(batch),
                         float(ce.detach()) * len(batch))
            bar.update(1)
            if time.perf_counter() - start > cfg.time_budget_s:
                stopped_by = "time"
                break
        epoch += 1
        total_seen += seen
        row = {"epoch": epoch, "loss": sums[0] / seen, "kd": sums[1] / seen, "ce": sums[2] / seen,
               "embed": sums[3] / seen, "extra": sums[4] / seen, "queries": seen,
               "seconds": time.perf_counter() - t_epoch, "lr": sched.get_last_lr()[0]}
        if valid is not None and cfg.track_valid:
            row["valid_mrr@10"] = evaluate_student(student, valid)["mrr@10"]
            student.train()
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", kd=f"{row['kd']:.3f}",
                        **({"valid_mrr": f"{row['valid_mrr@10']:.3f}"} if "valid_mrr@10" in row
                           else {}))
        if stopped_by == "time":
            break
        if epoch == 1 and cfg.epochs > 1:  # re-plan to the epochs that fit the budget
            per_epoch = time.perf_counter() - start
            fitting = 1 + int((cfg.time_budget_s - per_epoch) / per_epoch)
            plan["epochs"] = max(1, min(cfg.epochs, fitting))
            bar.total = plan["epochs"] * steps_per_epoch
            bar.refresh()
    bar.close()
    student.eval()
    seconds = time.perf_counter() - start
    return {
        "epochs_run": epoch, "epochs_requested": cfg.epochs, "epochs_planned": plan["epochs"],
        "steps": step, "seconds": seconds, "stopped_by": stopped_by,
        "queries_per_s": total_seen / max(seconds, 1e-9),
        "student_scale": float(student.scale.detach()), "history": history,
    }

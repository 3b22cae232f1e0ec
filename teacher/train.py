"""Fine-tune the teacher bi-encoder for code search, with a promotion gate.

Loss: in-batch negatives plus BM25 hard negatives (sentence-transformers'
MultipleNegativesRankingLoss): for query ``q_i`` with positive ``p_i`` and the
pool ``D`` of all positives and hard negatives in the batch,

    L = -1/B * sum_i log( exp(s * cos(q_i, p_i)) / sum_{d in D} exp(s * cos(q_i, d)) )

with ``s`` the teacher's logit scale. Training stops at ``max_steps`` or
``time_budget_s``, whichever comes first, so it fits any CPU budget. The new
teacher becomes *current* only if its valid MRR@10 beats the current one's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from codistill.config import TrainSettings
from codistill.fsio import publish_dir
from codistill.ranking import RankingExample
from teacher import registry
from teacher.model import Teacher, TeacherCard, TeacherRegistry


@dataclass
class Triple:
    query: str
    positive: str
    negatives: list[str]


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    examples_seen: int
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        head = float(np.mean(self.losses[:5])) if self.losses else float("nan")
        tail = float(np.mean(self.losses[-5:])) if self.losses else float("nan")
        return {"steps": self.steps, "seconds": round(self.seconds, 1),
                "examples_seen": self.examples_seen, "loss_first5": head, "loss_last5": tail}


def make_triples(examples: Sequence[RankingExample], hard_negatives: int, seed: int) -> list[Triple]:
    """(query, gold, hard negatives) per example; BM25 negatives from meta, else random ones."""
    rng = random.Random(seed)
    triples = []
    for ex in examples:
        gold = ex.gold_index
        hard_ids = set(ex.meta.get("hard_negative_ids", []))
        hard = [c for c, cid in zip(ex.candidates, ex.candidate_ids, strict=True) if cid in hard_ids]
        if not hard:
            hard = [c for i, c in enumerate(ex.candidates) if ex.labels[i] == 0]
            rng.shuffle(hard)
        triples.append(Triple(ex.query, ex.candidates[gold], hard[:hard_negatives]))
    return triples


def finetune(teacher: Teacher, triples: Sequence[Triple], cfg: TrainSettings, progress: bool = True) -> FinetuneResult:
    """Train ``teacher.model`` in place under the step/time budget."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = teacher.model
    model.max_seq_length = cfg.max_seq_length
    _freeze(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (cfg.max_steps - s) / max(1, cfg.max_steps - warmup)))
    )
    order = list(range(len(triples)))
    result = FinetuneResult(steps=0, seconds=0.0, examples_seen=0)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.max_steps, desc="fine-tune", unit="step", disable=not progress)
    pos_in_epoch = len(order)
    while result.steps < cfg.max_steps and time.perf_counter() - start < cfg.time_budget_s:
        if pos_in_epoch + cfg.batch_size > len(order):
            rng.shuffle(order)
            pos_in_epoch = 0
        batch = [triples[i] for i in order[pos_in_epoch : pos_in_epoch + cfg.batch_size]]
        pos_in_epoch += cfg.batch_size
        docs = [t.positive for t in batch] + [n for t in batch for n in t.negatives]
        q = model(model.preprocess([t.query for t in batch]))["sentence_embedding"]
        d = model(model.preprocess(docs))["sentence_embedding"]
        sim = teacher.logit_scale * F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        loss = F.cross_entropy(sim, torch.arange(len(batch), device=sim.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.steps += 1
        result.examples_seen += len(batch)
        result.losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    bar.close()
    model.eval()
    model.max_seq_length = teacher.card.max_seq_length
    result.seconds = time.perf_counter() - start
    return result


def _freeze(model, cfg: TrainSettings) -> None:
    """Freeze the embedding layer and, with ``train_layers``, all but the top N layers."""
    import re

    layer_of = re.compile(r"\.layers?\.(\d+)\.")
    n_layers = 1 + max((int(m.group(1)) for n, _ in model.named_parameters()
                        if (m := layer_of.search(n))), default=-1)
    lowest_trained = n_layers - cfg.train_layers if cfg.train_layers else 0
    for name, p in model.named_parameters():
        m = layer_of.search(name)
        frozen = (cfg.freeze_embeddings or cfg.train_layers) and ".embeddings." in name
        frozen = frozen or (m is not None and int(m.group(1)) < lowest_trained)
        p.requires_grad_(not frozen)


def save_finetuned(
    teacher: Teacher,
    reg: TeacherRegistry,
    cfg: TrainSettings,
    data_hash: str | None,
    result: FinetuneResult,
) -> TeacherCard:
    """Write safetensors weights and a card; the version derives from the weights hash."""
    staging = reg.dir / "_staging"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    teacher.model.save(str(staging), create_model_card=False, safe_serialization=True)
    weights = registry.sha256_file(staging / "model.safetensors")
    card = TeacherCard(
        base=teacher.card.base,
        kind="fine-tuned",
        model_path="",
        weights_sha256=weights,
        logit_scale=teacher.logit_scale,
        max_seq_length=teacher.card.max_seq_length,
        dim=teacher.dim,
        data_hash=data_hash,
        train={"from": teacher.version, "config": cfg.model_dump(), "result": result.summary()},
    )
    card.describe_folder(staging)
    card.teacher_version = card.compute_version()
    card.model_path = f"{card.teacher_version}/model"
    target = reg.dir / card.model_path
    if target.exists():  # the same content again: keep the files, refresh the card
        import shutil

        shutil.rmtree(staging)
        return reg.save(card)
    target.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(staging, target)
    return reg.save(card)

"""Offline distillation: warm-start a student from the teacher's soft labels in the store.

The teacher's *scores* are what ``codistill teacher precompute`` left in the store
for the train split: per query, the raw cosine of every candidate (teacher logits =
``logit_scale * cosine``) and the query's embedding; per candidate, its embedding.
The teacher model runs only for the static start (``init="teacher"``: one encoding
per subword, ``student.static_init``, cached). The student is trained on

    ``alpha * ListwiseKD_T(student, teacher logits over the list)
      + (1 - alpha) * listwise CE(student, hard labels)
      + embed_weight * (1 - cos(student emb, teacher emb))`` (batch queries + candidates)

with the losses of ``student.losses`` (the online trainer uses the same KD). Two
students: ``asym-bow`` (default; query tower only, scored against the teacher's
stored candidate vectors, ``student.asym``) and the symmetric ``bow``.

Measured on demo data (2,000 train queries, valid / test MRR@10, 10 epochs; BM25
0.467 / 0.522, fine-tuned teacher 0.740 / 0.746):

* ``bow``, random table: 0.474 / 0.464 plain; matching the teacher's embeddings
  (``embed_weight=4``) 0.497 / 0.475; hard-label CE against every candidate of the
  batch (``in_batch_negatives``) 0.503 / 0.469. Pure KD, T=2, lr 2e-3, weight decay,
  dim 64 or 256, more OOV buckets, 40 epochs and shorter candidates did no better.
* ``bow`` with the static start: 0.55 / 0.49; ``asym-bow`` random: 0.505 / 0.523;
  ``asym-bow`` static start: **0.668 / 0.669** (``benchmarks/student.py``).

Why texts are tokenised once and fed as bags: WordPiece is the costly part of a
bag-of-subwords forward pass, every candidate recurs in many lists and epochs, and
the student's own tower materialises ``[n, L, dim]``. ``BowStudent.embed_bags``
computes the same function with ``embedding_bag`` over distinct ids (~12x faster
per step on one thread); any other student kind goes through its own towers. The
run has an epoch *and* a wall-clock budget: after the first epoch the plan shrinks
to the epochs that fit, and the learning-rate schedule decays over that plan.

The teacher version is the store's *current* one; it is pinned while training
(``student:distilling-...``) and then for the saved student (``student:<version>``),
so the labels a student was built from are never expired under it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from codistill import metrics
from codistill.config import DistillConfig, Settings
from codistill.ranking import RankingExample
from stores.base import SoftLabelRecord, Store
from student.asym import AsymmetricBowStudent, StoreCandidates
from student.base import CandidateSource, Student
from student.baselines import evaluate_bm25
from student.bow import BowConfig, BowStudent
from student.losses import IPWClickLoss, ListwiseKDLoss
from student.registry import StudentCard, student_registry
from student.static_init import init_from_table, static_table
from student.tokenizer import SubwordTokenizer

log = logging.getLogger("codistill.student")

EVAL_SPLITS = ("valid", "test")
LABEL_CHUNK = 512  # query ids per get_labels call: one round trip per chunk, not per query


# ---------------------------------------------------------------- data
class Bags(NamedTuple):
    """Texts as bags for ``embedding_bag``: distinct ids, where each bag starts, counts."""

    ids: torch.Tensor  # [nnz] compact subword ids
    offsets: torch.Tensor  # [n] start of each bag in ``ids``
    counts: torch.Tensor  # [nnz] occurrences of the id in its text (after truncation)
    bag: torch.Tensor  # [nnz] which bag each id belongs to


class TokenisedTexts:
    """Texts tokenised once: a padded id matrix (any student) and bags of subwords (BoW).

    The bags are CSR rows of (distinct compact id, count), truncated like the padded
    form, so a bag-of-subwords tower can be computed with one ``embedding_bag`` instead
    of materialising ``[n, L, dim]`` (see ``BowStudent.embed_bags``).
    """

    def __init__(self, tokenizer: SubwordTokenizer, texts: Sequence[str], max_len: int) -> None:
        self.ids, self.mask = tokenizer.encode_batch(list(texts), max_len)
        self.lengths = self.mask.sum(1)
        indptr, flat, counts = [0], [], []
        for row in self.ids.numpy():
            uniq, cnt = np.unique(row[row != 0], return_counts=True)
            flat.append(uniq)
            counts.append(cnt)
            indptr.append(indptr[-1] + len(uniq))
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.flat = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        self.counts = (np.concatenate(counts) if counts else np.zeros(0)).astype(np.float32)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(ids, mask)`` of the selected texts, trimmed to their longest."""
        width = max(int(self.lengths[index].max()), 1) if index.numel() else 1
        return self.ids[index, :width], self.mask[index, :width]

    def bags(self, index: torch.Tensor) -> Bags:
        """The selected texts as ``Bags``, in the order of ``index``."""
        rows = index.numpy()
        starts, sizes = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(rows) else np.zeros(0)
        take = np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()))
        bag = np.repeat(np.arange(len(rows)), sizes)
        return Bags(torch.from_numpy(self.flat[take]), torch.from_numpy(offsets.astype(np.int64)),
                    torch.from_numpy(self.counts[take]), torch.from_numpy(bag))


class BatchOut(NamedTuple):
    """One batch through the student.

    ``logits`` ``[B, K]`` are the scores of each query's own list (``mask`` marks real
    candidates); ``full`` ``[B, U]`` scores every query against every distinct candidate
    of the batch, ``gather`` maps list positions to its columns; ``q`` / ``c`` are the
    embeddings and ``unique`` the train-candidate rows of the columns.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    full: torch.Tensor
    gather: torch.Tensor
    q: torch.Tensor
    c: torch.Tensor
    unique: torch.Tensor


class TrainSet:
    """Train queries, their candidate rows, teacher logits and hard labels as tensors.

    Lists may be ragged: ``mask`` marks real candidates, padded columns point at row 0.
    """

    def __init__(
        self, examples: Sequence[RankingExample], records: Sequence[SoftLabelRecord],
        tokenizer: SubwordTokenizer, cfg: DistillConfig,
    ) -> None:
        position: dict[str, int] = {}
        self.candidate_ids: list[str] = []
        for ex in examples:
            for text, cid in zip(ex.candidates, ex.candidate_ids, strict=True):
                if text not in position:
                    position[text] = len(position)
                    self.candidate_ids.append(cid)
        width = max(len(ex.candidates) for ex in examples)
        n = len(examples)
        self.cand_index = torch.zeros(n, width, dtype=torch.long)
        self.mask = torch.zeros(n, width, dtype=torch.bool)
        self.teacher_logits = torch.zeros(n, width)
        self.labels = torch.zeros(n, width)
        for i, (ex, rec) in enumerate(zip(examples, records, strict=True)):
            k = len(ex.candidates)
            self.cand_index[i, :k] = torch.tensor([position[t] for t in ex.candidates])
            self.mask[i, :k] = True
            self.teacher_logits[i, :k] = torch.from_numpy(
                rec.logit_scale * rec.scores.astype(np.float32))
            self.labels[i, :k] = torch.tensor(ex.labels, dtype=torch.float32)
        self.queries = TokenisedTexts(tokenizer, [ex.query for ex in examples], cfg.query_max_len)
        self.candidates = TokenisedTexts(tokenizer, list(position), cfg.candidate_max_len)
        # the teacher's own embeddings, for the optional embedding-matching term
        self.teacher_queries = F.normalize(torch.from_numpy(np.stack(
            [r.query_embedding.astype(np.float32) for r in records])), dim=-1)
        self.teacher_candidates: torch.Tensor | None = None

    def attach_candidate_embeddings(self, store: Store, version: str) -> None:
        """Read the teacher's embedding of every train candidate (one batched call)."""
        emb, found = store.get_embeddings(version, self.candidate_ids)
        if not found.all():
            raise LookupError(f"teacher {version}: {int((~found).sum())} train candidate "
                              "embeddings missing from the store; run precompute again")
        self.teacher_candidates = F.normalize(torch.from_numpy(emb.astype(np.float32)), dim=-1)

    def __len__(self) -> int:
        return self.cand_index.shape[0]

    def student_logits(self, student: Student, batch: torch.Tensor,
                       fast: bool = True) -> torch.Tensor:
        """``[B, K]`` student logits of the batch; each distinct candidate encoded once."""
        return self.forward(student, batch, fast).logits

    def forward(self, student: Student, batch: torch.Tensor, fast: bool = True) -> BatchOut:
        """Scores and embeddings of a batch (see ``BatchOut``).

        A ``BowStudent`` goes through ``embed_bags`` unless ``fast`` is False, any other
        student through its own towers on padded ids; a student without a candidate
        tower is scored against the teacher's candidate embeddings.
        """
        mask = self.mask[batch]
        rows = self.cand_index[batch]
        unique, inverse = torch.unique(rows[mask], return_inverse=True)
        gather = torch.zeros_like(rows)
        gather[mask] = inverse
        bow = fast and isinstance(student, BowStudent)
        if bow:
            q = student.embed_bags(0, *self.queries.bags(batch), len(batch))  # type: ignore[operator]
        else:
            q = student.embed_queries(*self.queries.rows(batch))
        if not student.has_candidate_tower:  # asymmetric: the teacher's own candidate vectors
            if self.teacher_candidates is None:
                raise RuntimeError("attach_candidate_embeddings first: the student has no "
                                   "candidate tower")
            c = self.teacher_candidates[unique]
        elif bow:
            c = student.embed_bags(-1, *self.candidates.bags(unique), len(unique))  # type: ignore[operator]
        else:
            c = student.embed_candidates(*self.candidates.rows(unique))
        full = student.score_embeddings(q, c)
        logits = full.gather(1, gather).masked_fill(~mask, 0.0)
        return BatchOut(logits, mask, full, gather, q, c, unique)

    def in_batch_labels(self, batch: torch.Tensor, out: BatchOut) -> torch.Tensor:
        """Hard labels over every candidate of the batch ``[B, U]``: other lists' code is 0."""
        labels = (self.labels[batch] * out.mask).to(out.full.dtype)
        return torch.zeros_like(out.full).scatter_reduce(1, out.gather, labels, "amax")


def read_labels(
    store: Store, version: str, examples: Sequence[RankingExample], chunk: int = LABEL_CHUNK
) -> list[SoftLabelRecord]:
    """The teacher's records for ``examples`` in batched reads; each must match its list."""
    records: list[SoftLabelRecord] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        got = store.get_labels(version, [ex.query_id for ex in part])
        for ex, rec in zip(part, got, strict=True):
            if rec is None:
                raise LookupError(
                    f"teacher {version} has no soft labels for query {ex.query_id}: run "
                    "`codistill teacher precompute` on this data first"
                )
            if rec.candidate_ids != ex.candidate_ids:
                raise LookupError(
                    f"soft labels of query {ex.query_id} (teacher {version}) were computed for "
                    "another candidate list: the data changed since precompute; run it again"
                )
        records.extend(got)  # type: ignore[arg-type]  # None was ruled out above
    return records


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def student_scores(student: Student, examples: Sequence[RankingExample]) -> list[np.ndarray]:
    """The student's logits for every list; each distinct text is encoded once."""
    was_training = student.training
    student.eval()
    try:
        position: dict[str, int] = {}
        for ex in examples:
            for text in ex.candidates:
                position.setdefault(text, len(position))
        q = student.encode_queries([ex.query for ex in examples])
        c = student.encode_candidates(list(position))
        out = []
        for i, ex in enumerate(examples):
            rows = torch.tensor([position[t] for t in ex.candidates])
            out.append(student.score_embeddings(q[i : i + 1], c[rows])[0].float().numpy())
        return out
    finally:
        student.train(was_training)


def evaluate_student(student: Student, examples: Sequence[RankingExample]) -> dict[str, float]:
    """MRR@10, NDCG@10, Recall@k of a student on a ranking set."""
    return metrics.evaluate(student_scores(student, examples), [ex.labels for ex in examples])


def teacher_kl(scores: Sequence[np.ndarray], records: Sequence[SoftLabelRecord],
               temperature: float = 1.0) -> float:
    """Mean ``KL(teacher || student)`` of the candidate distributions at ``temperature``.

    How far the student's ranking of *whole lists* is from the teacher's, on queries
    it never trained on: a less noisy view of transfer than MRR, which only looks at
    the gold candidate.
    """
    total = 0.0
    for s, rec in zip(scores, records, strict=True):
        log_t = _log_softmax(rec.logit_scale * rec.scores.astype(np.float64) / temperature)
        log_s = _log_softmax(np.asarray(s, dtype=np.float64) / temperature)
        total += float((np.exp(log_t) * (log_t - log_s)).sum())
    return total / max(len(records), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def teacher_metrics_from_store(
    store: Store, version: str, examples: Sequence[RankingExample]
) -> dict[str, float]:
    """The teacher's metrics recomputed from its stored scores (no teacher model needed)."""
    records = read_labels(store, version, examples)
    return metrics.evaluate([r.scores for r in records], [ex.labels for ex in examples])


def _teacher_metrics(
    settings: Settings, store: Store, version: str, split: str, examples: Sequence[RankingExample]
) -> tuple[dict[str, float], str]:
    """Card metrics when the teacher was evaluated on exactly this data, else from the store."""
    from tasks.dataset import metric_label
    from teacher.workflow import teacher_registry

    try:
        card = teacher_registry(settings).load(version)
        found = card.metrics.get(metric_label(settings, split))
    except FileNotFoundError:  # labels written by a teacher registered elsewhere
        found = None
    if found and int(found.get("n_queries", -1)) == len(examples):
        return dict(found), "card"
    return teacher_metrics_from_store(store, version, examples), "store"


def _teacher_encoder(settings: Settings, version: str, progress: bool
                     ) -> Callable[[Sequence[str]], np.ndarray]:
    """The teacher's cached ``encode`` for the static start, or a clear error."""
    from teacher.workflow import open_teacher

    try:
        teacher = open_teacher(settings, version, progress)
    except FileNotFoundError as exc:
        raise LookupError(
            f"init='teacher' needs the model of teacher {version} in this home's registry "
            f"({exc}); distil with init='random' to train from the stored labels alone"
        ) from exc
    return lambda texts: teacher.encode(list(texts), desc="subword embeddings")


def share_kept(student: dict[str, float], teacher: dict[str, float], key: str = "mrr@10") -> float:
    """Share of the teacher's metric the student keeps (``nan`` if the teacher scores 0)."""
    return student[key] / teacher[key] if teacher[key] > 0 else float("nan")


def _speed(
    settings: Settings, student: Student, version: str, queries: list[str]
) -> dict[str, Any]:
    """Query-encoding throughput (batched) and latency (one query) of student and teacher.

    Both sides score against precomputed candidate embeddings in serving, so the
    query side is the cost that matters. The teacher is timed on its model directly
    (its embedding cache would answer these queries from disk).
    """

    def timed(fn: Any, texts: list[str]) -> dict[str, float]:
        fn(texts[:8])  # warm-up
        t0 = time.perf_counter()
        fn(texts)
        batch_s = time.perf_counter() - t0
        single = texts[:32]
        t0 = time.perf_counter()
        for text in single:
            fn([text])
        one_s = (time.perf_counter() - t0) / len(single)
        return {"queries_per_s": len(texts) / batch_s, "latency_ms": 1000 * one_s}

    with torch.inference_mode():
        out: dict[str, Any] = {"student": timed(student.encode_queries, queries)}
    try:
        from teacher.workflow import open_teacher

        teacher = open_teacher(settings, version, progress=False)
        model = teacher.model
        out["teacher"] = timed(
            lambda t: model.encode(t, batch_size=settings.teacher.batch_size,
                                   show_progress_bar=False), queries)
    except Exception as exc:  # speed is a report, never a reason to fail a distillation
        log.warning("teacher speed not measured: %s", exc)
        return out
    out["speedup_batch"] = out["student"]["queries_per_s"] / out["teacher"]["queries_per_s"]
    out["speedup_latency"] = out["teacher"]["latency_ms"] / out["student"]["latency_ms"]
    return out


# ---------------------------------------------------------------- training
def build_student(
    examples: Sequence[RankingExample], teacher_version: str, cfg: DistillConfig,
    init_scale: float = 20.0, teacher_dim: int = 384,
    candidate_source: CandidateSource | None = None,
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> BowStudent:
    """A fresh ``cfg.student`` with its vocabulary fitted on the train queries and candidates.

    The vocabulary includes code subwords even for the query-only ``asym-bow``: with
    the static start they carry the teacher's meaning, so a held-out query naming an
    identifier seen only in code is still understood. ``encode`` (texts -> the
    teacher's embeddings) is required by ``init="teacher"``; ``candidate_source`` by
    ``asym-bow``.
    """
    texts = [ex.query for ex in examples]
    texts += list(dict.fromkeys(c for ex in examples for c in ex.candidates))
    tokenizer = SubwordTokenizer(max_vocab=cfg.max_vocab, oov_buckets=cfg.oov_buckets).fit(texts)
    dim = cfg.dim or (teacher_dim if cfg.init == "teacher" else 128)
    out_dim = cfg.out_dim or teacher_dim
    if cfg.init == "teacher" and not dim == out_dim == teacher_dim:
        raise ValueError(f"init='teacher' needs dim = out_dim = the teacher's dim ({teacher_dim}); "
                         f"got dim={dim}, out_dim={out_dim}")
    torch.manual_seed(cfg.seed)
    kind = AsymmetricBowStudent if cfg.student == "asym-bow" else BowStudent
    student = kind(
        tokenizer, teacher_version, BowConfig(dim=dim, out_dim=out_dim),
        query_max_len=cfg.query_max_len, candidate_max_len=cfg.candidate_max_len,
        init_scale=init_scale, candidate_source=candidate_source,
    )
    if cfg.init == "teacher":
        if encode is None:
            raise ValueError("init='teacher' needs the teacher's encode function")
        init_from_table(student, static_table(tokenizer, encode))
    return student


def train_student(
    student: Student, data: TrainSet, cfg: DistillConfig, progress: bool = True,
    valid: Sequence[RankingExample] | None = None,
) -> dict[str, Any]:
    """Train in place under ``cfg.epochs`` and ``cfg.time_budget_s``; returns the history.

    Per epoch: mean loss and its parts (KD, hard-label CE, embedding match) on the
    train split, and with ``valid`` and ``cfg.track_valid`` the valid MRR@10.
    """
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
        sums, seen = np.zeros(4), 0
        for batch in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            out = data.forward(student, batch)
            kd = kd_fn(out.logits, data.teacher_logits[batch], out.mask)
            if cfg.in_batch_negatives:
                ce = ce_fn(out.full, data.in_batch_labels(batch, out))
            else:
                ce = ce_fn(out.logits, data.labels[batch], mask=out.mask)
            loss = cfg.alpha * kd + (1.0 - cfg.alpha) * ce
            if cfg.embed_weight > 0:
                assert data.teacher_candidates is not None
                match = (2.0 - (out.q * data.teacher_queries[batch]).sum(-1).mean()
                         - (out.c * data.teacher_candidates[out.unique]).sum(-1).mean())
                loss = loss + cfg.embed_weight * match
                sums[3] += float(match.detach()) * len(batch)
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
               "embed": sums[3] / seen, "queries": seen,
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
            fit = 1 + int((cfg.time_budget_s - per_epoch) / per_epoch)
            plan["epochs"] = max(1, min(cfg.epochs, fit))
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


# ---------------------------------------------------------------- the command
def distill(settings: Settings, cfg: DistillConfig | None = None, progress: bool = True,
            set_current: bool = True) -> dict[str, Any]:
    """Distil a student from the store's current teacher version, evaluate it, save it.

    Returns a JSON-ready summary: versions, training history, student / BM25 /
    teacher metrics on valid and test, the share of the teacher's MRR@10 kept,
    size and query-encoding speed.
    """
    cfg = cfg or DistillConfig()
    threads = torch.get_num_threads()
    if cfg.threads:  # see DistillConfig.threads
        torch.set_num_threads(cfg.threads)
    try:
        return _distill(settings, cfg, progress, set_current)
    finally:
        torch.set_num_threads(threads)


def _distill(settings: Settings, cfg: DistillConfig, progress: bool, set_current: bool
             ) -> dict[str, Any]:
    from stores import open_configured_store
    from tasks.dataset import manifest_data_hash, metric_label, read_split

    t_start = time.perf_counter()
    clock: dict[str, float] = {}
    store = open_configured_store(settings)
    try:
        version = store.current()
        if version is None:
            raise LookupError(
                f"the store ({store.describe()}) has no current teacher version: "
                "run `codistill teacher precompute` first"
            )
        info = store.get_version(version)
        if info is None:
            raise LookupError(f"{store.describe()}: current version {version} has no manifest")
        if cfg.embed_weight > 0 and cfg.out_dim not in (None, info.dim):
            raise ValueError(f"embed_weight needs out_dim = the teacher's dim ({info.dim})")
        holding = f"student:distilling-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        store.pin(version, holding)
        try:
            splits = {sp: read_split(settings, sp) for sp in ("train", *EVAL_SPLITS)}
            records = read_labels(store, version, splits["train"])
            encode = _teacher_encoder(settings, version, progress) if cfg.init == "teacher" \
                else None
            student = build_student(splits["train"], version, cfg, init_scale=info.logit_scale,
                                    teacher_dim=info.dim,
                                    candidate_source=StoreCandidates(store, version),
                                    encode=encode)
            data = TrainSet(splits["train"], records, student.tokenizer, cfg)
            if cfg.embed_weight > 0 or not student.has_candidate_tower:
                data.attach_candidate_embeddings(store, version)
            held_out = {sp: read_labels(store, version, splits[sp]) for sp in EVAL_SPLITS}

            def assess(sp: str) -> dict[str, float]:
                scores = student_scores(student, splits[sp])
                m = metrics.evaluate(scores, [ex.labels for ex in splits[sp]])
                m["teacher_kl"] = teacher_kl(scores, held_out[sp])
                return m

            # the same architecture before training: a pure lexical matcher (shared towers)
            untrained = {sp: assess(sp) for sp in EVAL_SPLITS}
            clock["prepare"] = time.perf_counter() - t_start

            train = train_student(student, data, cfg, progress, valid=splits["valid"])
            clock["train"] = train["seconds"]

            t0 = time.perf_counter()
            results: dict[str, dict[str, dict[str, float]]] = {
                "student": {}, "untrained": untrained, "bm25": {}, "teacher": {}}
            sources = {}
            for sp in EVAL_SPLITS:
                results["student"][sp] = assess(sp)
                results["bm25"][sp] = evaluate_bm25(splits[sp])
                results["teacher"][sp], sources[sp] = _teacher_metrics(
                    settings, store, version, sp, splits[sp])
            clock["evaluate"] = time.perf_counter() - t0
            kept = {sp: share_kept(results["student"][sp], results["teacher"][sp])
                    for sp in EVAL_SPLITS}
            size = student.size_report()

            reg = student_registry(settings.home)
            card = reg.save(student, StudentCard(
                kind=student.kind, teacher_version=version, weights_sha256="",
                recipe=cfg.recipe(), size=size, data_hash=manifest_data_hash(settings),
                train={k: v for k, v in train.items() if k != "history"},
                metrics={metric_label(settings, sp): m for sp, m in results["student"].items()},
            ))
            store.pin(version, f"student:{card.student_version}")
            if set_current:
                reg.set_current(card.student_version)
        finally:
            store.unpin(version, holding)
        speed = None
        if cfg.measure_speed:
            t0 = time.perf_counter()
            speed = _speed(settings, student, version, [ex.query for ex in splits["test"]])
            clock["speed"] = time.perf_counter() - t0
        store_name = store.describe()
    finally:
        store.close()
    clock["total"] = time.perf_counter() - t_start
    return {
        "student_version": card.student_version,
        "teacher_version": version,
        "current": set_current,
        "path": str(reg.path(card.student_version)),
        "store": store_name,
        "data": {"size": settings.data.size, "data_hash": manifest_data_hash(settings),
                 "train_queries": len(data), "train_candidates": len(data.candidate_ids),
                 "vocab_size": student.tokenizer.vocab_size},
        "config": cfg.model_dump(),
        "train": train,
        "results": results,
        "teacher_metrics_source": sources,
        "share_of_teacher_mrr@10": kept,
        "size": size,
        "speed": speed,
        "seconds": clock,
    }


def demo_step(settings: Settings, progress: bool = True, cfg: DistillConfig | None = None,
              console: Any = None) -> dict[str, Any]:
    """The demo job's distillation step: distil within budget, report, return the summary.

    Call it after precompute. At demo size (2,000 train queries x 32 candidates) the
    default 10 epochs take ~25 s of training and ~40-50 s for the whole step (labels,
    tokeniser, training, evaluation, teacher speed check) on 2 shared cores; the
    training loop is capped at 65 s so that a loaded machine still ends near 90 s.
    With a ``rich`` console the comparison table is printed.
    """
    summary = distill(settings, cfg or DistillConfig(), progress)
    if console is not None:
        console.print(results_table(summary))
    return summary


def results_table(summary: dict[str, Any]) -> Any:
    """Student / BM25 / teacher x valid / test as a ``rich`` table."""
    from rich.table import Table

    res = summary["results"]
    size = summary["size"]
    table = Table(title=f"student {summary['student_version']} <- teacher "
                        f"{summary['teacher_version']} ({size['megabytes']:.1f} MB, "
                        f"{summary['train']['epochs_run']} epochs, "
                        f"{summary['train']['seconds']:.0f}s)")
    table.add_column("model")
    for sp in EVAL_SPLITS:
        table.add_column(f"{sp} MRR@10", justify="right")
        table.add_column(f"{sp} NDCG@10", justify="right")
        table.add_column(f"{sp} share of teacher MRR", justify="right")
    for name in ("student", "untrained", "bm25", "teacher"):
        cells = []
        for sp in EVAL_SPLITS:
            m, t = res[name][sp], res["teacher"][sp]
            cells += [f"{m['mrr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{share_kept(m, t):.1%}"]
        table.add_row("student before training" if name == "untrained" else name, *cells)
    speed = summary.get("speed") or {}
    if "speedup_batch" in speed:
        table.caption = (f"query encoding: student {speed['student']['queries_per_s']:.0f}/s, "
                         f"teacher {speed['teacher']['queries_per_s']:.0f}/s "
                         f"({speed['speedup_batch']:.0f}x batched, "
                         f"{speed['speedup_latency']:.0f}x one query)")
    return table

"""The students a user would pick instead of codistill's: Model2Vec static models.

Distilled from the *same* teacher (the loaded ``teacher.model.Teacher``, zero-shot or
fine-tuned) with ``model2vec.distill.distill_from_model``, saved, and judged on the
same lists as the students (``benchmarks/student.py``):

* **symmetric** (PCA 64 / 128 / 256): queries and candidates both encoded by the
  static model, score = cosine. This is how a Model2Vec model is used.
* **as a query encoder** (no PCA): the static model keeps the teacher's output space,
  so its query vectors can be scored against the teacher's stored candidate vectors,
  the setting codistill's ``asym-bow`` student is in.

Install: the ``peers`` extra (``model2vec`` and ``skeletoken`` without
``model2vec[distill]``, whose ``transformers<5.4`` pin conflicts with the lock;
``distill_from_model`` only needs torch, transformers and skeletoken to import).

References
----------
.. [1] Tulkens, van Dongen. "Model2Vec: Fast State-of-the-Art Static Embeddings". 2024.
   https://github.com/MinishLab/model2vec
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codistill import metrics
from codistill.ranking import RankingExample
from stores.base import Store


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (what loading the model reads)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def distill_model2vec(teacher: Any, pca_dims: int | None, folder: Path) -> tuple[Any, dict]:
    """A Model2Vec static model of ``teacher`` (float16 table), saved to ``folder``.

    Returns the model and ``{"bytes", "seconds", "pca_dims", "dim"}``.
    """
    from model2vec.distill import distill_from_model

    t0 = time.perf_counter()
    model = distill_from_model(model=teacher.model[0].auto_model,
                               tokenizer=teacher.model.tokenizer, pca_dims=pca_dims,
                               quantize_to="float16")
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(folder))
    return model, {"bytes": folder_bytes(folder), "seconds": seconds, "pca_dims": pca_dims,
                   "dim": int(model.dim)}


def _encode(model: Any, texts: Sequence[str]) -> np.ndarray:
    vec = np.asarray(model.encode(list(texts), show_progress_bar=False), dtype=np.float32)
    return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


def peer_metrics(model: Any, examples: Sequence[RankingExample], store: Store | None = None,
                 version: str | None = None) -> dict[str, float]:
    """MRR@10 / NDCG@10 of a static model on ranking lists.

    With ``store`` and ``version`` the candidates are the teacher's stored vectors
    (query-encoder use); otherwise the model encodes them too (symmetric use).
    """
    from student.base import unique_candidates

    queries = _encode(model, [ex.query for ex in examples])
    texts, ids = unique_candidates([ex.candidates for ex in examples],
                                   [ex.candidate_ids for ex in examples])
    if store is not None and version is not None:
        cands, found = store.get_embeddings(version, ids)
        if not found.all():
            raise LookupError(f"{int((~found).sum())} candidates lack teacher vectors")
        cands = cands.astype(np.float32)
        cands /= np.maximum(np.linalg.norm(cands, axis=1, keepdims=True), 1e-12)
    else:
        cands = _encode(model, list(texts))
    scores = [cands[[texts[t] for t in ex.candidates]] @ queries[i]
              for i, ex in enumerate(examples)]
    return metrics.evaluate(scores, [ex.labels for ex in examples])


def tokenlearn_style(teacher: Any, texts: Sequence[str], targets: np.ndarray,
                     pca_dims: int | None, folder: Path, *, epochs: int = 10, lr: float = 1e-3,
                     batch_size: int = 256, seed: int = 0) -> tuple[Any, dict]:
    """Tokenlearn's recipe, reproduced with model2vec and this loop (not the package).

    Tokenlearn featurizes a corpus with the teacher and trains a Model2Vec model's
    token table so that the mean of a text's token vectors regresses onto the
    teacher's embedding of that text; its featurizer reads a hub data set, which this
    project may not download. Here: a no-PCA Model2Vec model of ``teacher`` (SIF
    weights folded into the table), trained with AdamW on ``1 - cos(mean of token
    vectors, teacher vector)`` over ``texts`` (the project's own corpus, embedded by
    the same teacher), early-stopped on a seeded 10% of the corpus as Tokenlearn
    does, then reduced by PCA to ``pca_dims`` and stored as float16. Differences from
    the package: cosine instead of MSE on PCA-reduced targets, and no vocabulary
    growth.

    Returns the model and ``{"bytes", "seconds", "pca_dims", "dim", "epochs_run",
    "corpus", "held_out_loss"}``.

    References
    ----------
    .. [1] MinishLab. "Tokenlearn: learn token embeddings from a teacher". 2025.
       https://github.com/MinishLab/tokenlearn
    """
    import torch
    import torch.nn.functional as F
    from model2vec import StaticModel
    from model2vec.distill import distill_from_model
    from sklearn.decomposition import PCA

    t0 = time.perf_counter()
    base = distill_from_model(model=teacher.model[0].auto_model,
                              tokenizer=teacher.model.tokenizer, pca_dims=None,
                              quantize_to="float32")
    n_tokens = base.tokenizer.get_vocab_size()
    rows = np.arange(n_tokens) if base.token_mapping is None else base.token_mapping
    table = np.asarray(base.embedding, dtype=np.float32)[rows]
    if base.weights is not None:
        table = table * np.asarray(base.weights, dtype=np.float32)[:, None]
    ids = [seq[:512] or [0] for seq in base.tokenize(list(texts))]
    order = np.random.default_rng(seed).permutation(len(ids))
    n_held = max(1, len(ids) // 10)
    held, train = order[:n_held], order[n_held:]
    target = F.normalize(torch.from_numpy(np.asarray(targets, dtype=np.float32)), dim=-1)
    weight = torch.nn.Parameter(torch.from_numpy(table.copy()))
    opt = torch.optim.AdamW([weight], lr=lr)

    def loss_of(index: np.ndarray) -> torch.Tensor:
        flat = torch.tensor([t for i in index for t in ids[i]], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0] + [len(ids[i]) for i in index[:-1]]),
                               dtype=torch.long)
        pooled = F.embedding_bag(flat, weight, offsets, mode="mean")
        return 1.0 - F.cosine_similarity(pooled, target[index], dim=-1).mean()

    gen = np.random.default_rng(seed + 1)
    best, best_table, epochs_run = float("inf"), table, 0
    for _ in range(epochs):
        shuffled = train[gen.permutation(len(train))]
        for start in range(0, len(shuffled), batch_size):
            opt.zero_grad(set_to_none=True)
            loss_of(shuffled[start:start + batch_size]).backward()
            opt.step()
        epochs_run += 1
        with torch.no_grad():
            held_loss = float(loss_of(held))
        if held_loss >= best:
            break
        best, best_table = held_loss, weight.detach().numpy().copy()
    vectors = best_table
    if pca_dims is not None:
        vectors = PCA(n_components=pca_dims, random_state=seed).fit_transform(vectors)
    model = StaticModel(vectors=vectors.astype(np.float16), tokenizer=base.tokenizer,
                        config=dict(base.config), normalize=True)
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(folder))
    return model, {"bytes": folder_bytes(folder), "seconds": seconds, "pca_dims": pca_dims,
                   "dim": int(model.dim), "epochs_run": epochs_run, "corpus": len(ids),
                   "held_out_loss": round(best, 4)}

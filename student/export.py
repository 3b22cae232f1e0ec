"""ONNX export of a student's towers: the bundle a server runs without torch.

``onnx_export(student, directory)`` writes, next to what ``Student.save`` writes:

========================== =============================================================
file                       content
========================== =============================================================
``query_encoder.onnx``     the query tower
``candidate_encoder.onnx`` the candidate tower (only if ``student.has_candidate_tower``)
``onnx.json``              ``kind``, ``teacher_version``, ``logit_scale``,
                           ``query_max_len``, ``candidate_max_len`` and ``files``
                           (side -> file name)
========================== =============================================================

Each graph takes ``input_ids`` and ``attention_mask``, int64 ``[batch, sequence]``
(both axes dynamic), and returns ``embeddings``, float32 ``[batch, d]``,
L2-normalised; a score is ``logit_scale * (q @ c.T)``. The ids are the student's
compact subword ids (``SubwordTokenizer``, whose state is in ``config.json``); a
student without a candidate tower is scored against its teacher's candidate
embeddings (same ``teacher_version``). The file names and ``onnx.json`` keys are the
format: a reader needs this description, not this module.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student.base import Student
from student.bow import BowStudent

ONNX_QUERY_FILE = "query_encoder.onnx"
ONNX_CANDIDATE_FILE = "candidate_encoder.onnx"
ONNX_META_FILE = "onnx.json"
ONNX_OPSET = 17


class _Tower(nn.Module):
    """Exposes one side of a student as ``forward(input_ids, attention_mask)`` for export."""

    def __init__(self, student: Student, side: str) -> None:
        super().__init__()
        self.student = student
        self.side = side

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.side == "query":
            return self.student.embed_queries(input_ids, attention_mask)
        return self.student.embed_candidates(input_ids, attention_mask)


class _FoldedBowTower(nn.Module):
    """A bag-of-subwords tower with its projection folded into the subword table.

    The projection is linear and bias-free and the tower ends in an L2 normalisation,
    so ``normalize(P (sum_i w_i e_i) / sum_i w_i) = normalize(sum_i w_i (P e_i))``:
    the table ``E P^T`` is computed once at export, and serving does one gather and
    one weighted sum per query, no matrix product (the largest cost of a BoW query
    on ONNX Runtime). Used when the table does not grow (``out_dim <= dim``).
    """

    def __init__(self, student: BowStudent, side: str) -> None:
        super().__init__()
        i = 0 if side == "query" else -1
        with torch.no_grad():
            table = student.embeddings[i].weight @ student.projections[i].weight.T
            self.table = nn.Parameter(table.detach().clone(), requires_grad=False)
            weights = student.token_weights[i].weight.detach().clone()
            self.weights = nn.Parameter(weights, requires_grad=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        emb = F.embedding(input_ids, self.table)  # [n, L, out]
        w = F.softplus(F.embedding(input_ids, self.weights).squeeze(-1))
        w = w * attention_mask.to(emb.dtype)
        return F.normalize((w.unsqueeze(-1) * emb).sum(1), dim=-1)


def _tower(student: Student, side: str) -> nn.Module:
    if isinstance(student, BowStudent) and student.config.out_dim <= student.config.dim:
        return _FoldedBowTower(student, side)
    return _Tower(student, side)


def onnx_export(student: Student, directory: str | Path) -> dict[str, Path]:
    """Write the student's query (and candidate) tower as ONNX graphs plus ``onnx.json``.

    The graphs are traced from the padded towers (``embed_queries`` /
    ``embed_candidates``; a bag-of-subwords tower with its projection folded into
    the table, see ``_FoldedBowTower``) with the TorchScript exporter at opset ``ONNX_OPSET``, in
    eval mode; the student's mode is restored afterwards. The vocabulary stays in
    ``config.json``: write it with ``student.save`` into the same directory.

    Parameters
    ----------
    student : Student
        Any student.
    directory : str or Path
        Output folder (created if missing; files in it are overwritten).

    Returns
    -------
    dict of str to Path
        ``"query"``, ``"candidate"`` (if the student has a candidate tower) and
        ``"meta"`` (``onnx.json``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sides = {"query": ONNX_QUERY_FILE}
    if student.has_candidate_tower:
        sides["candidate"] = ONNX_CANDIDATE_FILE
    was_training = student.training
    student.eval()
    ids = torch.tensor([[2, 3, 4], [5, 0, 0]], dtype=torch.long, device=student.log_scale.device)
    mask = (ids != 0).long()
    axes = {0: "batch", 1: "sequence"}
    paths: dict[str, Path] = {}
    try:
        for side, name in sides.items():
            paths[side] = directory / name
            with warnings.catch_warnings():
                # the TorchScript exporter is deprecated but needs no onnxscript
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    _tower(student, side),
                    (ids, mask),
                    str(paths[side]),
                    input_names=["input_ids", "attention_mask"],
                    output_names=["embeddings"],
                    dynamic_axes={
                        "input_ids": axes,
                        "attention_mask": axes,
                        "embeddings": {0: "batch"},
                    },
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
    finally:
        student.train(was_training)
    meta = {
        "kind": student.kind,
        "teacher_version": student.teacher_version,
        "logit_scale": float(student.scale.detach()),
        "query_max_len": student.query_max_len,
        "candidate_max_len": student.candidate_max_len,
        "files": {side: p.name for side, p in paths.items()},
    }
    paths["meta"] = directory / ONNX_META_FILE
    paths["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths

"""The student recipes: how a student is distilled and what its exported bundle must pass.

Apart from ``codistill.config`` (which re-exports them) because they are the
student's own contract: a recipe's fields enter the student version, and
``benchmarks/student.py`` builds variants from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A settings section: an unknown key (a typo in a file or a variable) is an error,
    never silently ignored in favour of the default."""

    model_config = ConfigDict(extra="forbid")


class DistillConfig(Section):
    """Recipe of an offline distillation run (``settings.distill``; part of the student version).

    Read by ``student.distill.distill`` and ``student.training.fit``; the loss these
    fields weight is described in ``student.training``. ``recipe()`` is the part that
    shapes the weights and so enters the student version; ``threads``,
    ``track_valid`` and ``measure_speed`` only change how the run is executed and
    reported.

    Small sets need more epochs: ``epochs`` counts passes, and 200 train queries
    make only 7 steps a pass (``small`` wants ~60). ``time_budget_s`` caps the
    training loop's wall clock: after the first epoch the plan shrinks to the
    epochs that fit, so a capped run is not reproducible across machines (the
    benchmark sets it to 1e9).

    ``threads`` defaults to 1: the ops are small, and on a shared machine OpenMP
    threads spin against other jobs. Measured results of the default recipe:
    ``benchmarks/results/student-demo.json``.
    """

    epochs: int = Field(15, ge=1)
    time_budget_s: float = Field(65.0, gt=0, description="wall-clock cap of the training loop")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of KD; 1 - alpha on hard labels")
    temperature: float = Field(4.0, gt=0)
    batch_size: int = Field(32, ge=1, description="queries per step")
    lr: float = Field(3e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0
    student: Literal["asym-bow", "bow"] = Field(
        "asym-bow", description="asym-bow: query tower vs the teacher's stored candidate "
        "embeddings (student.asym); bow: symmetric bi-encoder with its own code tower")
    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: subword table = the teacher's embedding of each "
        "subword (student.static_init; needs the teacher model and dim = its dim)")
    max_vocab: int = Field(16384, ge=1)
    oov_buckets: int = Field(8, ge=1)
    dim: int | None = Field(256, ge=1, description="subword table width (also with "
                            "init=random); capped at the teacher's dim with init=teacher "
                            "(narrower: a rank-k start, student.static_init); None = the "
                            "teacher's dim with init=teacher, else 128")
    out_dim: int | None = Field(None, ge=1, description="embedding size; None = the teacher's")
    in_batch_negatives: bool = Field(
        True, description="hard-label CE against every candidate in the batch, not just the list")
    embed_weight: float = Field(
        4.0, ge=0.0, description="weight of 1 - cosine(student, teacher embedding) on the batch's "
        "queries and candidates (needs out_dim = the teacher's dim)")
    code_queries: bool = Field(
        True, description="the train candidates' code as extra queries for the query tower, "
        "against their stored teacher vectors (student.extra)")
    unlabeled: int = Field(0, ge=0, description="texts of the data's unlabeled.jsonl (train "
                           "groups only, tasks.unlabeled) as extra queries, embedded by the "
                           "teacher once (cached); 0 = none")
    unlabeled_kinds: list[Literal["summary", "code", "sentence", "name", "comment"]] | None = \
        Field(None, description="kinds of unlabeled text used (tasks.unlabeled); None = all")
    extra_batch: int = Field(64, ge=1, description="extra queries per step")
    extra_list: int = Field(128, ge=2, description="teacher candidate vectors in each extra "
                            "query's pseudo-list")
    extra_weight: float = Field(4.0, ge=0.0, description="weight of 1 - cos(student, teacher) "
                                "on the extra queries")
    extra_kd_weight: float = Field(1.0, ge=0.0, description="weight of listwise KD over the "
                                   "extra queries' pseudo-lists")
    query_max_len: int = Field(64, ge=1)
    candidate_max_len: int = Field(256, ge=1)
    threads: int = Field(1, ge=0, description="torch threads while distilling; 0 = leave as is")
    track_valid: bool = Field(True, description="valid MRR@10 after each epoch (logged only)")
    measure_speed: bool = Field(True, description="time query encoding of student and teacher")

    def recipe(self) -> dict[str, Any]:
        """The fields that shape the weights (not the budget-only or reporting ones)."""
        return self.model_dump(exclude={"track_valid", "measure_speed", "threads"})


class ExportConfig(Section):
    """``codistill student export``: the checks a bundle must pass before it is written."""

    parity_lists: int | None = Field(None, ge=1, description="valid lists scored by torch and "
                                     "ONNX Runtime; None = all")
    max_score_diff: float = Field(1e-3, gt=0, description="largest |torch - ONNX| logit, fp32")
    tie_eps: float = Field(1e-5, gt=0, description="top-10 swaps allowed between items whose "
                           "torch scores differ by less than this")
    int8_max_score_diff: float = Field(1.0, gt=0, description="the same bound for int8 graphs")
    int8_order_agreement: float = Field(0.9, ge=0, le=1, description="int8: mean top-10 "
                                        "overlap with torch required")
    fuzz_strings: int = Field(500, ge=0, description="random strings in the token-parity check")
    drift_reference: int = Field(256, ge=0, description="training queries embedded into the "
                                 "bundle as the server's drift reference (float16, so 256 x "
                                 "d x 2 bytes of the bundle); 0 = none")
    seed: int = 0

"""The HTTP API's request and response bodies (pydantic, so the OpenAPI schema is exact).

Static bounds live in the schema (an id is 1-256 characters, ``top_k`` >= 1, at
least one candidate), so ``schemathesis`` and clients see them; the configurable
limits (``serving.max_candidates``, ``max_query_chars``, ``max_text_chars``) are
checked by the server with a 422 that names the limit and the setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Id = str


class CandidateIn(BaseModel):
    """A candidate by id (its teacher vector or stored text is looked up), by text, or both."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=256,
                           description="candidate id; default: content hash of the text")
    text: str | None = Field(None, description="code text; needed for a candidate the "
                             "server has no vector for")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, description="natural-language or code query")
    candidates: list[CandidateIn] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="results returned (default "
                              "serving.default_top_k), at most the candidates given")


class RankedItem(BaseModel):
    id: str
    score: float
    rank: int
    fallback: bool = Field(False, description="encoded from its text by the fallback graph "
                           "(no teacher vector yet)")


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    results: list[RankedItem]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    candidate_id: str = Field(min_length=1, max_length=256)
    action: Literal["click", "accept", "skip"]
    dwell_ms: float | None = Field(None, ge=0, le=86_400_000)
    propensity: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False,
        description="examination probability of the clicked position, in (0, 1], as the "
        "client's click model or propensity estimate gave it; written to the feedback event "
        "(schema v2) so an inverse-propensity learner divides by it")


class FeedbackResponse(BaseModel):
    request_id: str
    candidate_id: str
    position: int


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=128)


class BundleInfo(BaseModel):
    version: str
    kind: str
    teacher_version: str
    precision: str
    created_at: str
    slot: Literal["serving", "candidate", "previous"] | None = None


class AdminResult(BaseModel):
    action: str
    serving: str | None
    previous: str | None
    detail: str = ""


class Readiness(BaseModel):
    ready: bool
    detail: str


class Problem(BaseModel):
    """Every 4xx body: what was wrong, in one sentence."""

    detail: str

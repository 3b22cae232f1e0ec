"""One configuration object for every command.

Precedence (highest first): explicit overrides (CLI flags) > environment
variables (``CODISTILL_`` prefix, ``__`` for nesting, e.g.
``CODISTILL_STORE__BACKEND=redis``) > a YAML or TOML file (``--config FILE`` or
``CODISTILL_CONFIG``) > defaults. The defaults run everything on the embedded,
on-disk backends, so no service is needed to try the framework.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from codistill.gate import GateConfig
from codistill.recipes import DistillConfig, ExportConfig, Section

Size = Literal["small", "demo", "full"]


class DataSettings(Section):
    size: Size = "demo"
    negatives: int = Field(31, ge=1, description="negatives per query (candidates = 1 + negatives)")
    hard_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of negatives from BM25")
    seed: int = 0
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    guard_sets: list[Literal["nl2code-prose", "code2code-versions"]] | None = Field(
        None, description="guard sets to build, evaluate and gate on (tasks.guards); None = "
        "both, except at small: nl2code-prose only (code2code-versions downloads wheels)")


class TrainSettings(Section):
    """Fine-tuning budget: whichever of steps / seconds runs out first stops training."""

    max_steps: int = Field(60, ge=0)
    time_budget_s: float = Field(180.0, gt=0)
    batch_size: int = Field(16, ge=2)
    hard_negatives: int = Field(1, ge=0, description="BM25 hard negatives per query in a batch")
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    seed: int = 0
    max_seq_length: int = 96
    freeze_embeddings: bool = Field(True, description="keep the embedding layer fixed (faster on CPU)")
    train_layers: int = Field(
        2, ge=0, description="fine-tune only the top N transformer layers (0 = all); "
        "backward then stops at the first trainable layer, which is what makes CPU training fast"
    )


class TeacherSettings(Section):
    model: str = Field("minilm", description="pretrained teacher: minilm | mpnet | a local folder")
    max_seq_length: int = 128
    logit_scale: float = Field(20.0, gt=0, description="teacher logits = scale * cosine")
    batch_size: int = 64
    train: TrainSettings = TrainSettings()
    gate: GateConfig = Field(GateConfig(), description="promotion of fine-tuned teachers "
                             "(codistill.gate); superiority: better on valid, with confidence")


class StoreSettings(Section):
    backend: Literal["embedded", "redis"] = "embedded"
    path: Path | None = Field(None, description="embedded store folder; default HOME/store")
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "codistill"
    embedding_dtype: Literal["float16", "float32"] = "float16"
    ttl_s: int | None = Field(None, description="expire *unpinned, non-current* versions after this")
    batch_size: int = Field(256, ge=1, description="records per write batch / MGET")


class StreamSettings(Section):
    backend: Literal["embedded", "kafka"] = "embedded"
    path: Path | None = Field(None, description="embedded event-log folder; default HOME/events")
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "codistill.events"
    dlq_topic: str = "codistill.events.dlq"
    partitions: int = 4
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None


class BackoffConfig(Section):
    """Retry policy for an unreachable store or stream: ``initial * factor^n``, capped."""

    initial_s: float = Field(0.05, gt=0)
    max_s: float = Field(5.0, gt=0)
    factor: float = Field(2.0, ge=1)
    give_up_after_s: float | None = Field(None, gt=0, description="None: retry forever")


class OnlineTrainerConfig(Section):
    """The online trainer (``codistill student online``; section ``online`` of ``Settings``).

    ``batch_size``, ``alpha``, ``temperature``, ``eta``, ``lr`` (and ``max_ipw_weight``,
    ``weight_decay``, ``max_grad_norm``) shape the updates, so a resume refuses other
    values than its checkpoint's unless ``accept_changes``; the rest say where state
    lives, when to stop and how to retry.
    """


    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="trainer identity: checkpoint folder, lease, default group")
    group: str | None = Field(None, description="consumer group; default codistill-trainer-NAME")
    teacher_version: str | None = Field(None, description="None: the checkpoint's, else current")
    batch_size: int = Field(64, ge=1, description="records per batch per partition (B)")
    checkpoint_every: int = Field(10, ge=1, description="batches between checkpoints")
    publish_every: int | None = Field(None, ge=1, description="publish a serving bundle from "
                                      "the first checkpoint at least this many batches after "
                                      "the last one, and at the end (`codistill student "
                                      "online`); None = never")
    keep_checkpoints: int = Field(2, ge=1)
    alpha: float = Field(0.5, ge=0, le=1, description="KD weight; 1 - alpha on feedback")
    temperature: float = Field(4.0, gt=0, description="KD temperature")
    eta: float = Field(1.0, ge=0, description="position-bias exponent; 0 = naive clicks")
    max_ipw_weight: float = Field(10.0, ge=1)
    lr: float = Field(3e-3, gt=0, description="3e-3 trains a student from scratch; a warm start "
                      "from a distilled student wants ~1e-4 (see codistill.app.online_demo)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(5.0, gt=0)
    seed: int = 0
    window_s: float = Field(60.0, ge=0, description="join window after an impression")
    allowed_lateness_s: float = Field(10.0, ge=0)
    max_batches: int | None = Field(None, ge=0, description="stop after this many, this run")
    until_end: bool = Field(False, description="stop at the end offsets seen at start, applying "
                            "the partial last batches and flushing the joiner")
    flush_at_end: bool = True
    max_batch_wait_s: float | None = Field(
        None, gt=0, description="live mode: a partition whose oldest waiting record is older "
        "than this is applied as a partial batch, and a partition without waiting records "
        "for this long is idle (its join watermark follows the other partitions'); None: "
        "full batches only. Every such decision is recorded in the plan before it is applied")
    replay_plan: Path | None = Field(None, description="apply the entries of this plan (a "
                                     "trainer's checkpoints-plan folder, or a .jsonl file) and "
                                     "stop: a fresh trainer replays that run exactly")
    poll_interval_s: float = Field(0.2, gt=0)
    labeller: bool = Field(False, description="a nearline labeller (codistill teacher label "
                           "--follow) fills the store: a shown candidate with a stored text "
                           "but no teacher vector yet is pending (trained around, recorded "
                           "in the plan), not a dead letter")
    label_wait_s: float = Field(2.0, ge=0, description="with labeller: how long planning a "
                                "batch waits for its pending candidates' vectors")
    metrics_port: int = Field(0, ge=0, description="Prometheus /metrics port; 0 = off")
    metrics_host: str = Field("127.0.0.1", description="address /metrics binds (0.0.0.0 "
                              "in a container, so Prometheus can scrape it)")
    drift_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence")
    drift_window: int = Field(2000, ge=1, description="inputs per drift signal kept (JSON) in "
                              "checkpoints to rebuild ADWIN on resume; exact while it covers "
                              "every input since the detector's last reset")
    lease_ttl_s: float = Field(120.0, gt=0, description="lease on the teacher version, renewed "
                               "every third of it while the trainer runs; a killed trainer's "
                               "lease runs out after this")
    accept_changes: bool = Field(False, description="resume with other hyperparameters than the "
                                 "checkpoint's (never batch_size), starting a new segment")
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="where a new trainer (no checkpoint) begins on each partition: "
        "the log start or its end offset; recorded as the partition's start in the ledger")
    accept_gap: bool = Field(False, description="resume although the log start moved past the "
                             "checkpoint's offsets (retention): the lost records are recorded "
                             "as a gap in the ledger and skipped")
    checkpoint_dir: Path | None = Field(None, description="default HOME/online/NAME/checkpoints")
    output_dir: Path | None = Field(None, description="final student; HOME/online/NAME/student")
    init_student: Path | None = Field(None, description="warm start from a student directory")
    max_vocab: int = Field(16384, ge=1)
    oov_buckets: int = Field(8, ge=1)
    dim: int = Field(128, ge=1)
    out_dim: int = Field(256, ge=1)
    query_max_len: int = Field(64, ge=1)
    candidate_max_len: int = Field(128, ge=1, description="subwords; the teacher reads 128")
    token_cache: int = Field(200_000, ge=0, description="texts whose subword ids are cached "
                             "(a stream shows the same candidates again and again); 0 = off")
    vocab_from_data: bool = Field(True, description="also fit the vocabulary on train-split "
                                  "queries when HOME/data/SIZE/train.jsonl exists")
    threads: int | None = Field(
        1, ge=1, description="torch intra-op threads; None = settings.threads. 1 by default: "
        "a BoW step is many small ops, and OpenMP threads on a busy machine spend more "
        "time waiting at barriers than computing")
    deterministic: bool = True
    backoff: BackoffConfig = BackoffConfig()


class LabellerSettings(Section):
    """The nearline labeller (``codistill teacher label``): reads the events topic as
    ``group``, appends the labels and embeddings the version lacks (insert-if-absent: a
    replay writes nothing twice); a candidate without a stored text is looked up again on
    ``max_text_retries`` later batches, then left out of its queries' records."""

    group: str = Field("codistill-labeller", min_length=1, description="consumer group")
    batch_size: int = Field(256, ge=1, description="records polled per step")
    encode_batch: int = Field(128, ge=1, description="texts per teacher.encode call")
    max_text_retries: int = Field(5, ge=0, description="later batches on which a candidate "
                                  "without a stored text is looked up again")
    lease_ttl_s: float = Field(120.0, gt=0, description="lease on the teacher version, renewed "
                               "every third of it; a killed labeller's lease runs out after this")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="/metrics; None = off")
    metrics_host: str = Field("127.0.0.1", description="/metrics binds (0.0.0.0 in a container)")


class MonitorSettings(Section):
    """The server's quality and drift signals (``serving.monitor``), measured off the
    request path by one background thread (``serving.monitor``)."""

    enabled: bool = True
    agreement_sample: float = Field(0.25, ge=0, le=1, description="share of ranked requests "
                                    "whose order is compared with the teacher's soft label")
    queue: int = Field(1_000, ge=1, description="requests waiting for the monitor; more are "
                       "skipped (counted), never waited for")
    mmd_window: int = Field(50, ge=10, description="recent distinct queries whose embeddings "
                            "are compared with the training queries and the baseline window")
    mmd_every: int = Field(25, ge=1, description="queries between two MMD computations")
    mmd_permutations: int = Field(200, ge=10, description="permutations behind each "
                                  "window's p-value against the baseline window")
    detector: Literal["adwin", "page-hinkley"] = Field("adwin", description="river drift "
                                                       "detector run on every signal")
    delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence")
    hold_s: float = Field(60.0, ge=0, description="drift_state stays 1 this long after a "
                          "detection, so a scrape cannot miss it")


class ServingSettings(Section):
    """``codistill serve``: the ONNX Runtime server, its limits and its event output."""

    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 inside a container)")
    port: int = Field(8000, ge=0, le=65535)
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per session")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    bundle: str | None = Field(None, description="bundle to serve at start; None = the "
                               "registry's serving pointer, else the newest")
    max_candidates: int = Field(200, ge=1)
    max_query_chars: int = Field(2_000, ge=1)
    max_text_chars: int = Field(20_000, ge=1, description="per candidate text")
    default_top_k: int = Field(10, ge=1)
    user_supplied_ids: bool = Field(False, description="ids are user names, not content "
                                    "hashes: an id and a text that disagree are accepted")
    vector_cache: int = Field(100_000, ge=0, description="teacher vectors kept in memory")
    impressions_kept: int = Field(100_000, ge=1, description="served impressions remembered "
                                  "for /v1/feedback (LRU)")
    event_queue: int = Field(10_000, ge=1, description="events waiting for the log; more drop")
    emit_events: bool = True
    store_unready_after_s: float = Field(30.0, gt=0, description="/readyz false after the "
                                         "store has failed this long")
    probe_budget_ms: float = Field(50.0, gt=0, description="a new bundle's query encode must "
                                   "stay within this before it is swapped in")
    admin_api_key: str | None = Field(None, description="enables /v1/admin; compared in "
                                      "constant time; unset or empty = admin off")
    monitor: MonitorSettings = MonitorSettings()
    gate: GateConfig = Field(GateConfig(mode="non-inferiority"), description="serve-watch: a "
                             "new bundle must be no worse than the serving one on valid and "
                             "every guard set")
    export: ExportConfig = ExportConfig()

    @property
    def local_url(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind as loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


class WatcherSettings(Section):
    """``codistill serve-watch``: where the server is, how often to look, its metrics."""

    server_url: str | None = Field(None, description="default http://serving.host:serving.port")
    interval_s: float = Field(30.0, gt=0, description="seconds between polls")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics; 0 = off")
    metrics_host: str = "127.0.0.1"


class TrafficSettings(Section):
    """``codistill traffic``: a load generator that ranks real queries and clicks.

    It sends ``/v1/rank`` for queries from ``sources`` in turn (each for
    ``switch_after`` requests, the last until the end), then feedback drawn from a
    position-biased click model on the known gold candidate, so online quality and the
    drift panels have something to show.
    """

    server_url: str | None = Field(None, description="default http://serving.host:serving.port")
    rate: float = Field(20.0, gt=0, description="rank requests per second")
    requests: int | None = Field(None, ge=1, description="stop after this many; None = forever")
    sources: list[str] = Field(["valid", "guard:nl2code-prose"], min_length=1, description=(
        "query sources in order: a split (train, valid, test) or guard:<name>"))
    switch_after: int = Field(600, ge=1, description="requests per source before the next")
    click_eta: float = Field(1.0, ge=0, description="position bias: P(examine r) = 1 / r^eta")
    accept_share: float = Field(0.3, ge=0, le=1, description="gold clicks also accepted")
    seed: int = 0


class ExperimentSettings(Section):
    """``codistill experiment online``: arms on one seeded user stream (the closed loop).

    The user side (queries of the ``online`` split, true relevance with a preference the
    teacher does not know, clicks) is ``streaming.simulator``'s; ``switch_after``
    impressions in, the preference changes to ``switch_to``. Learning arms take one
    online-learner step per ``batch_size`` impressions of their own, ``lr_distilled``
    from the distilled student, ``lr_scratch`` from random weights.
    """

    seeds: int = Field(5, ge=1, description="seeded user streams (every arm sees each)")
    impressions: int = Field(4000, ge=2, description="impressions per arm and seed")
    switch_after: int = Field(2000, ge=1, description="impressions before the drift switch")
    click_model: str = Field("pbm", description="pbm, perfect, navigational, informational")
    strength: float = Field(0.5, ge=0, le=0.5, description="P(preferred negative relevant)")
    preference: str = Field("typed", description="the users' preference before the switch")
    switch_to: str = Field("raises", description="the preference after the switch")
    depth: int = Field(10, ge=1, description="results shown per impression")
    propensity: Literal["model", "swap"] = Field("model", description="click model's or by swaps")
    batch_size: int = Field(16, ge=1, description="impressions per learning step")
    alpha: float = Field(0.5, ge=0, le=1, description="KD weight of the kd+feedback arms")
    temperature: float = Field(4.0, gt=0)
    lr_distilled: float = Field(1e-3, gt=0, description="learning rate from the distilled start")
    lr_scratch: float = Field(3e-3, gt=0, description="learning rate from random weights")
    bin: int = Field(200, ge=1, description="impressions per point of the curves")
    strengths: list[float] = Field([0.0, 0.25, 0.5], description="gain-curve strengths; [] = none")
    sweep_seeds: int = Field(2, ge=1, description="seeds per point of the gain curve")
    stack_rate: float = Field(10.0, ge=0, description="--stack: impressions per second the "
                              "users send to the server; 0 = as fast as it answers")
    stack_publish_every: int = Field(4, ge=1, description="--stack: trainer batches between "
                                     "serving bundles (each is promoted as it appears)")
    stack_window_s: float = Field(1.0, gt=0, description="--stack: the trainer's join window "
                                  "and partial-batch wait (seconds)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CODISTILL_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(Path("artifacts"), description="where data, models and caches live")
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")
    embedding_cache: Path | None = Field(None, description="teacher embedding cache folder; "
                                         "default HOME/cache (content-addressed: shareable)")
    data: DataSettings = DataSettings()
    teacher: TeacherSettings = TeacherSettings()
    store: StoreSettings = StoreSettings()
    stream: StreamSettings = StreamSettings()
    distill: DistillConfig = DistillConfig()
    online: OnlineTrainerConfig = OnlineTrainerConfig()
    labeller: LabellerSettings = LabellerSettings()
    serving: ServingSettings = ServingSettings()
    watcher: WatcherSettings = WatcherSettings()
    traffic: TrafficSettings = TrafficSettings()
    experiment: ExperimentSettings = ExperimentSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        cfg = _config_file or os.environ.get("CODISTILL_CONFIG")
        if cfg:
            path = Path(cfg)
            if not path.exists():
                raise FileNotFoundError(f"config file not found: {path}")
            if path.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            elif path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                raise ValueError(f"config file must be .yaml, .yml or .toml: {path}")
        return tuple(sources)

    # Derived locations: one place decides the artifact layout.
    @property
    def data_dir(self) -> Path:
        return self.home / "data" / self.data.size

    @property
    def teachers_dir(self) -> Path:
        return self.home / "teachers"

    @property
    def cache_dir(self) -> Path:
        """``embedding_cache``, else per home; shared, homes re-encode nothing (keys are
        the content-addressed teacher version and the text hash)."""
        return self.embedding_cache or self.home / "cache"

    @property
    def download_dir(self) -> Path:
        """Pinned downloads (source wheels) shared by every home: immutable, so safe to share."""
        return Path(os.environ.get("CODISTILL_DOWNLOADS", Path.home() / ".cache" / "codistill"))

    @property
    def bundles_dir(self) -> Path:
        return self.home / "bundles"

    def resolved_store(self) -> StoreSettings:
        """Store settings with the embedded path filled in from ``home``."""
        return self.store.model_copy(update={"path": self.store.path or self.home / "store"})

    def resolved_stream(self) -> StreamSettings:
        return self.stream.model_copy(update={"path": self.stream.path or self.home / "events"})


_config_file: str | Path | None = None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional file (else ``CODISTILL_CONFIG``), the environment
    and overrides."""
    global _config_file
    _config_file = config_file
    try:
        return Settings(**overrides)
    finally:
        _config_file = None

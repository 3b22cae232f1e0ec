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

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

Size = Literal["small", "demo", "full"]


class DataSettings(BaseModel):
    size: Size = "demo"
    negatives: int = Field(31, ge=1, description="negatives per query (candidates = 1 + negatives)")
    hard_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of negatives from BM25")
    seed: int = 0
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)


class TrainSettings(BaseModel):
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


class TeacherSettings(BaseModel):
    model: str = Field("minilm", description="pretrained teacher: minilm | mpnet | a local folder")
    max_seq_length: int = 128
    query_max_length: int = 64
    logit_scale: float = Field(20.0, gt=0, description="teacher logits = scale * cosine")
    batch_size: int = 64
    train: TrainSettings = TrainSettings()


class StoreSettings(BaseModel):
    backend: Literal["embedded", "redis"] = "embedded"
    path: Path | None = Field(None, description="embedded store folder; default HOME/store")
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "codistill"
    embedding_dtype: Literal["float16", "float32"] = "float16"
    ttl_s: int | None = Field(None, description="expire *unpinned, non-current* versions after this")
    batch_size: int = Field(256, ge=1, description="records per write batch / MGET")


class StreamSettings(BaseModel):
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CODISTILL_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(Path("artifacts"), description="where data, models and caches live")
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")
    data: DataSettings = DataSettings()
    teacher: TeacherSettings = TeacherSettings()
    store: StoreSettings = StoreSettings()
    stream: StreamSettings = StreamSettings()

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
        return self.home / "cache"

    @property
    def download_dir(self) -> Path:
        """Pinned downloads (source wheels) shared by every home: immutable, so safe to share."""
        return Path(os.environ.get("CODISTILL_DOWNLOADS", Path.home() / ".cache" / "codistill"))

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

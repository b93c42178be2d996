"""All configuration, read from the environment once and passed in (never read from globals).

It lives in the lowest package because every layer needs some of it; ``agent_sessions``
re-exports it as the public ``Settings``. Each field documents its environment variable:
the four service URLs use their conventional names, everything else is ``ASC_<FIELD>``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Iterable
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
MAX_BATCH_BYTES = 1000 * MiB
DAY_S = 86_400


REDIS_SCHEMES = ("redis", "rediss", "unix")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
HTTP_SCHEMES = ("http", "https")
OTHER_VARIABLES: Final = frozenset({"ASC_LOG_FORMAT"})
"""``ASC_*`` variables read outside :class:`Settings` (``workers/logs.py``)."""

log = logging.getLogger(__name__)


def _url(value: str, schemes: tuple[str, ...]) -> str:
    """``value`` if it parses as a URL of one of ``schemes`` with a numeric port (if any)."""
    if not value.strip():
        raise ValueError("must not be empty")
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"must be a {'/'.join(schemes)} URL, got scheme {parts.scheme!r}")
    try:
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as exc:
        raise ValueError(f"has an invalid port: {exc}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host")
    return value


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"ASC_{name}", name)


class Settings(BaseSettings):
    """Runtime configuration. Defaults suit a single host; see the README's table."""

    model_config = SettingsConfigDict(env_prefix="ASC_", extra="ignore", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=_env("REDIS_URL"),
        description="Redis for the session cache (REDIS_URL); standalone or a cluster node.",
    )
    redis_cluster: bool = Field(False, description="Treat REDIS_URL as a Redis Cluster node.")
    rq_redis_url: str | None = Field(
        None,
        validation_alias=_env("RQ_REDIS_URL"),
        description="Standalone Redis for RQ (RQ_REDIS_URL); defaults to REDIS_URL.",
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/agent_sessions",
        validation_alias=_env("DATABASE_URL"),
        description="Postgres for the write-behind (DATABASE_URL).",
    )
    agent_backend_url: str | None = Field(
        None,
        validation_alias=_env("AGENT_BACKEND_URL"),
        description="Agent backend base URL (AGENT_BACKEND_URL); unset = clean up locally.",
    )
    key_prefix: str = Field("asc", pattern=r"^[A-Za-z0-9._-]{1,32}$")
    shards: int = Field(256, ge=1, le=16384, description="Logical shards; fixed once used.")
    flush_delay_ms: int = Field(1000, ge=0, description="Age a dirty entry reaches before flush.")
    flush_batch: int = Field(200, ge=1, le=10_000, description="Sessions per flush statement.")
    flush_threads: int = Field(
        2,
        ge=1,
        le=16,
        description="Threads a drain (agent-sessions flush --wait) flushes shards with: one "
        "builds rows while another waits on Postgres.",
    )
    flush_lock_ttl_s: float = Field(
        1.0,
        ge=0.2,
        le=60,
        description="Flush lock lifetime, renewed while the flush runs: how long a killed "
        "flusher can hold its shard.",
    )
    max_dirty_per_shard: int = Field(
        50_000, ge=0, description="Dirty sessions per shard before saves are refused; 0 = no bound."
    )
    active_ttl_s: int = Field(3 * DAY_S, ge=1, description="TTL of a flushed resumable session.")
    cleaned_ttl_s: int = Field(600, ge=1, description="TTL of a flushed session of an ended run.")
    ended_run_ttl_s: int = Field(7 * DAY_S, ge=1, description="How long an ended-run marker lives.")
    max_snapshot_bytes: int = Field(4 * MiB, ge=1024, description="Largest encoded snapshot.")
    max_specs_bytes: int = Field(1 * MiB, ge=1024, description="Largest encoded layer-spec list.")
    backend_timeout_s: float = Field(
        10.0, gt=0, description="Total deadline of one backend call, retries included."
    )
    cleanup_wait_s: float = Field(
        30.0, gt=0, description="How long a cleanup waits for its backend run to end."
    )
    cleanup_attempts: int = Field(
        5, ge=1, le=50, description="Cleanup attempts per session before it is given up."
    )
    socket_timeout_s: float = Field(5.0, gt=0, description="Redis socket timeout.")
    reconcile_grace_s: float = Field(
        60.0,
        ge=0,
        description="How long after a run's end the reconciler first checks that its end "
        "finished (every session stopped, cleaned up, flushed).",
    )
    reconcile_interval_s: float = Field(
        30.0, gt=0, description="Between the reconciler's checks of a run not settled yet."
    )
    conversation_idle_s: float = Field(
        3600.0,
        gt=0,
        description="A conversation's active sessions not saved for this long are retired "
        "and cleaned up on the backend (the reconciler checks every reconcile_interval_s / 2); "
        "its next turn starts fresh.",
    )
    durable_pauses: bool = Field(
        False,
        description="Write a paused session to Postgres before finish() returns, so that a "
        "Redis crash right after cannot lose the pause (costs one Postgres commit per pause).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Level of the project's own log lines that `agent-sessions worker` "
        "prints on stderr (its start-up checks, the flush trigger); RQ prints its own.",
    )

    @field_validator("redis_url", "rq_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value, REDIS_SCHEMES)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return _url(value, POSTGRES_SCHEMES)

    @field_validator("agent_backend_url")
    @classmethod
    def _backend_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value, HTTP_SCHEMES)

    @model_validator(mode="after")
    def _batch_fits_postgres(self) -> Settings:
        """A batch's snapshots travel as one ``bytea[]`` parameter, and Postgres refuses a
        value over 1 GiB: a batch of maximal snapshots must stay under it."""
        worst = self.flush_batch * self.max_snapshot_bytes
        if worst > MAX_BATCH_BYTES:
            raise ValueError(
                f"flush_batch x max_snapshot_bytes = {worst} bytes exceeds {MAX_BATCH_BYTES}; "
                "lower ASC_FLUSH_BATCH or ASC_MAX_SNAPSHOT_BYTES"
            )
        return self

    @model_validator(mode="after")
    def _tell_unknown_variables(self) -> Settings:
        """Say which ``ASC_*`` variables of the environment name no setting (once each)."""
        _warn_unknown(frozenset(name for name in os.environ if _ours(name)))
        return self

    @property
    def queue_redis_url(self) -> str:
        return self.rq_redis_url or self.redis_url


def _ours(name: str) -> bool:
    return name.upper().startswith("ASC_")


def known_variables() -> frozenset[str]:
    """Every ``ASC_*`` environment variable the project reads."""
    names = set(OTHER_VARIABLES)
    for field, info in Settings.model_fields.items():
        names.add(f"ASC_{field.upper()}")
        if isinstance(info.validation_alias, AliasChoices):
            names.update(str(choice) for choice in info.validation_alias.choices)
    return frozenset(name for name in names if _ours(name))


def unknown_variables(names: Iterable[str]) -> list[str]:
    """One line for each ``ASC_*`` name in ``names`` that no setting reads, naming the
    closest one that does (``ASC_PREFIX``: did you mean ``ASC_KEY_PREFIX``?)."""
    known = known_variables()
    stems = {name.removeprefix("ASC_"): name for name in known}
    lines = []
    for name in sorted(n for n in names if _ours(n) and n.upper() not in known):
        close = difflib.get_close_matches(name.upper()[4:], sorted(stems), n=1)
        hint = (
            f"did you mean {stems[close[0]]}?"
            if close
            else "the README's Configuration table lists the settings"
        )
        lines.append(f"{name} is not a setting of agent-session-cache and is ignored; {hint}")
    return lines


@functools.cache
def _warn_unknown(names: frozenset[str]) -> None:
    """Log :func:`unknown_variables` of ``names`` (a warning each), once per process."""
    for line in unknown_variables(names):
        log.warning("%s", line)

"""The SQLAlchemy engine every part of ``persistence`` uses (migrations, reads, the pool a
durable pause writes through); the flush's own connections are in ``persistence.direct``."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

CONNECT_TIMEOUT_S: Final = 5


def create_engine(database_url: str, **kwargs: Any) -> Engine:
    """An engine for ``database_url``; plain ``postgresql://`` URLs get the psycopg 3 driver.

    ``pool_pre_ping`` makes a connection that died while idle (server restart between
    flushes) reconnect instead of failing the next flush; the connect timeout turns an
    unreachable server into ``PersistenceUnavailable`` quickly rather than hanging a worker.
    """
    url = make_url(database_url)
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": CONNECT_TIMEOUT_S})
    return sa.create_engine(url, **kwargs)

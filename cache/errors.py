"""Every exception this project raises, under one root.

Callers catch :class:`AgentSessionsError` for "anything from the session store"; the
subclasses say what went wrong and whether retrying can help::

    AgentSessionsError
    ├── InvalidInput            bad input; nothing was written anywhere
    │   ├── InvalidId           an ID is empty, too long or not a string
    │   ├── InvalidSnapshot     a snapshot or layer spec is malformed
    │   └── PayloadTooLarge     an encoded snapshot or spec list is over its limit
    ├── ConfigurationError      the process is configured against the stored layout
    │   └── StartupCheckFailed  a process cannot start: a service does not answer, the
    │                           database or its schema is missing, a port is taken
    ├── CorruptValue            a value in Redis cannot be decoded (names the key)
    ├── Refused                 a script refused a write; nothing was written
    │   ├── RunEnded            the workflow run has ended; no save can land
    │   ├── RunUnknown          Redis has no marker of the run (lost or evicted): ask Postgres
    │   ├── VersionConflict     ``expected_version`` differs from the stored version
    │   └── BacklogFull         the shard's dirty backlog is at its bound
    ├── StoreUnavailable        Redis could not be reached, timed out or refused a command
    │   └── StoreOutOfMemory    Redis is over ``maxmemory``: a write was refused, nothing written
    ├── ScriptContractError     a script returned a code we do not know (a bug)
    ├── PersistenceError        Postgres (``persistence.errors``)
    ├── QueueError              RQ / worker side: the queue's Redis failed a request
    └── AgentBackendError       the agent backend (``agent_backend.errors``)

Lower layers define the roots of their own branches here so that every layer can raise
them without importing upward.
"""

from __future__ import annotations


class AgentSessionsError(Exception):
    """Root of every error raised by agent-session-cache."""


class InvalidInput(AgentSessionsError, ValueError):
    """The input was rejected before anything touched Redis or Postgres."""


class InvalidId(InvalidInput):
    """An ID is empty, longer than 255 characters, or not a string."""


class InvalidSnapshot(InvalidInput):
    """A snapshot or layer spec does not have the documented shape."""


class PayloadTooLarge(InvalidInput):
    """An encoded snapshot or layer-spec list is larger than its configured limit."""


class ConfigurationError(AgentSessionsError):
    """The configuration disagrees with what is stored (for example the shard count)."""


class StartupCheckFailed(ConfigurationError):
    """A check a long-running process makes before it starts any work failed; the message
    says what to do (``agent-sessions migrate``, create the database, free the port)."""


class CorruptValue(AgentSessionsError):
    """A value read from Redis cannot be decoded."""

    def __init__(self, key: str, field: str, reason: str) -> None:
        super().__init__(f"corrupt value in {key!r} field {field!r}: {reason}")
        self.key = key
        self.field = field
        self.reason = reason


class Refused(AgentSessionsError):
    """A script refused the operation; nothing was written."""


class RunEnded(Refused):
    """The workflow run has ended: no session of it can be saved again."""


class RunUnknown(Refused):
    """Redis has no marker of the run, so it cannot tell whether the run ended.

    Raised only by saves that asked for it (``verify_run``); ``workers.readthrough`` then
    reads the run's state from Postgres, restores the marker and saves again.
    """


class VersionConflict(Refused):
    """The stored version is not the ``expected_version`` the caller read."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"{key}: expected version {expected}, stored version is {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class BacklogFull(Refused):
    """The shard already holds its maximum number of sessions waiting for Postgres."""

    def __init__(self, key: str, backlog: int) -> None:
        super().__init__(f"{key}: shard dirty backlog is full ({backlog} sessions)")
        self.key = key
        self.backlog = backlog


class StoreUnavailable(AgentSessionsError):
    """Redis could not be reached, the call timed out, or Redis refused the command.

    ``outcome_unknown``: the command was sent and its reply was lost (a timeout, a dropped
    connection): a write may have been applied. Nothing resends it (it could apply twice);
    the next read tells what Redis holds.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class StoreOutOfMemory(StoreUnavailable):
    """Redis is over ``maxmemory`` and refused a write before anything was written.

    Every writing script carries a ``#!lua`` shebang, so Redis refuses it whole instead of
    failing halfway. Flushing still works (its scripts may run over the limit) and frees
    memory once acknowledged sessions expire or are evicted.
    """


class ScriptContractError(AgentSessionsError):
    """A Lua script answered with a code this version does not know: a bug."""


class PersistenceError(AgentSessionsError):
    """Postgres refused or failed an operation (see ``persistence.errors``)."""


class QueueError(AgentSessionsError):
    """The job queue failed an operation (see ``workers``)."""


class AgentBackendError(AgentSessionsError):
    """The agent backend failed a call (see ``agent_backend.client``)."""

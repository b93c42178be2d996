"""``translate_errors`` sorts driver errors into retry (unavailable) vs poison (rejected)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import exc as sa_exc

from cache.errors import PersistenceError
from persistence.errors import (
    PersistenceUnavailable,
    RowRejected,
    TransactionConflict,
    classify,
    translate_errors,
)


def wrapped(error: Exception, kind: type[sa_exc.DBAPIError] = sa_exc.DBAPIError) -> Exception:
    """``error`` as SQLAlchemy raises it from a statement."""
    return kind("INSERT ...", {}, error)


@pytest.mark.parametrize(
    "error",
    [
        pg_errors.UntranslatableCharacter("\\u0000 cannot be converted to text"),
        pg_errors.CharacterNotInRepertoire("invalid byte sequence for encoding UTF8: 0x00"),
        pg_errors.StringDataRightTruncation("value too long for type character varying(255)"),
        pg_errors.CheckViolation("violates check constraint"),
        pg_errors.NotNullViolation("null value in column"),
        pg_errors.ProgramLimitExceeded("total size of jsonb array elements exceeds the maximum"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ],
)
def test_errors_about_the_data_are_row_rejected(error: Exception) -> None:
    assert classify(error) is RowRejected
    assert classify(wrapped(error, sa_exc.OperationalError)) is RowRejected


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection refused"),
        pg_errors.AdminShutdown("terminating connection due to administrator command"),
        pg_errors.CannotConnectNow("the database system is starting up"),
        pg_errors.QueryCanceled("canceling statement due to statement timeout"),
        pg_errors.TooManyConnections("too many clients already"),
        psycopg.InterfaceError("the connection is closed"),
        sa_exc.TimeoutError("QueuePool limit reached"),
        ConnectionResetError("reset by peer"),
    ],
)
def test_errors_about_the_server_are_unavailable(error: Exception) -> None:
    assert classify(error) is PersistenceUnavailable


@pytest.mark.parametrize(
    "error",
    [
        pg_errors.DeadlockDetected("deadlock detected"),
        pg_errors.SerializationFailure("could not serialize access"),
        pg_errors.LockNotAvailable("could not obtain lock"),
    ],
)
def test_errors_of_a_lost_race_are_transaction_conflicts(error: Exception) -> None:
    """Class 40/55: the statement may pass next time, and may fail for one row only."""
    assert classify(error) is TransactionConflict
    assert classify(wrapped(error, sa_exc.OperationalError)) is TransactionConflict


def test_an_invalidated_connection_is_unavailable_whatever_the_error() -> None:
    error = sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert classify(error) is PersistenceUnavailable


def test_other_database_errors_are_plain_persistence_errors() -> None:
    missing_table = pg_errors.UndefinedTable('relation "workflow_agent_runtime_sessions"')
    assert classify(wrapped(missing_table, sa_exc.ProgrammingError)) is PersistenceError


def test_errors_that_are_not_from_the_database_are_left_alone() -> None:
    assert classify(KeyError("x")) is None
    with pytest.raises(KeyError), translate_errors():
        raise KeyError("x")


def test_translated_errors_keep_the_original_as_cause_and_a_one_line_message() -> None:
    original = wrapped(pg_errors.UntranslatableCharacter("bad escape\nDETAIL: more"))
    with pytest.raises(RowRejected) as caught, translate_errors():
        raise original
    assert caught.value.__cause__ is original
    assert "\n" not in str(caught.value)
    assert "bad escape" in str(caught.value)


def test_project_errors_pass_through_untouched() -> None:
    error = PersistenceUnavailable("already translated")
    with pytest.raises(PersistenceUnavailable) as caught, translate_errors():
        raise error
    assert caught.value is error

"""The upsert SQL shown in ``persistence.upsert``'s docstring is the statement that runs."""

from __future__ import annotations

import re

import persistence.upsert as upsert
from cache.records import OwnerType


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def compiled(owner: OwnerType) -> str:
    sql = upsert._UPSERTS[owner].sql.decode()
    constants = upsert._UPSERTS[owner].constants
    for name, value in constants.items():  # the literals the docstring shows in place
        sql = sql.replace(f"%({name})s::VARCHAR", f"'{value}'")
    return words(sql.replace("anon_1", "batch"))


def documented_clause(start: str, end: str) -> str:
    doc = upsert.__doc__ or ""
    return words(doc[doc.index(start) : doc.index(end)])


def test_the_documented_fence_is_the_compiled_one() -> None:
    fence = documented_clause(
        "WHERE agent_runtime_sessions.version < excluded.version", "RETURNING"
    )
    assert fence in compiled(OwnerType.WORKFLOW_RUN)


def test_the_documented_filters_and_conflict_target_are_the_compiled_ones() -> None:
    """The ended-owner filter, the went-back-in-time filter and the conflict target."""
    sql = compiled(OwnerType.WORKFLOW_RUN)
    assert documented_clause("ON CONFLICT (key_prefix", " DO UPDATE\n       SET") in sql
    assert documented_clause("WHERE (batch.status", "\n    ON CONFLICT") in sql
    conversation = compiled(OwnerType.CONVERSATION)
    assert (
        "ON CONFLICT (key_prefix, tenant_id, conversation_id, binding_id, agent_id, "
        "agent_config_snapshot_id)" in conversation
    )


def test_the_flushers_statement_is_the_compiled_one_with_numbered_parameters() -> None:
    """Every named parameter becomes its ``$n``, and nothing else of the SQL changes."""
    for owner in OwnerType:
        stmt = upsert._UPSERTS[owner]
        back = stmt.raw_sql
        for n, name in reversed(list(enumerate(stmt.order, start=1))):
            back = back.replace(b"$%d" % n, b"%%(%s)s" % name.encode())
        assert back == stmt.sql
        assert set(stmt.order) == set(re.findall(r"%\((\w+)\)s", stmt.sql.decode()))
        assert b"%(" not in stmt.raw_sql

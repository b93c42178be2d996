"""Postgres persistence: the sessions table, its migrations and the fenced repository."""

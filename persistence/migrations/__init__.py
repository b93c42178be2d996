"""Alembic migrations of the sessions table."""

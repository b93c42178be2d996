"""``agent-sessions migrate``: the Postgres schema through Alembic, with Alembic's verbs.

``migrate`` alone upgrades to the newest revision, as it always did; ``upgrade [REV]``,
``downgrade REV``, ``current`` and ``history`` are Alembic's commands of the same names, and
``--sql`` prints the statements instead of running them (Alembic's offline mode).
"""

from __future__ import annotations

import sys

import click

from cache.settings import Settings
from workers.preflight import using_line

sql_option = click.option(
    "--sql",
    is_flag=True,
    help="Print the SQL instead of running it (Alembic's offline mode; no database needed).",
)


@click.group(invoke_without_command=True)
@sql_option
@click.pass_context
def migrate(ctx: click.Context, sql: bool) -> None:
    """Create or upgrade the Postgres schema (Alembic). Without a subcommand: upgrade to the
    newest revision (`migrate --sql` prints that upgrade's SQL from an empty database).

    Existing rows from before migration 0005 are given ASC_KEY_PREFIX (the deployment that
    migrates).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(upgrade, revision="head", sql=sql)
    elif sql:
        raise click.UsageError("put --sql after the subcommand: `migrate upgrade --sql`")


@migrate.command()
@click.argument("revision", default="head")
@sql_option
def upgrade(revision: str, sql: bool) -> None:
    """Upgrade to REVISION (default: head). With --sql, REVISION may be FROM:TO
    (`0004:head`); without FROM the SQL starts from an empty database."""
    from persistence.migrate import current, upgrade_sql
    from persistence.migrate import upgrade as run_upgrade

    settings = Settings()
    if sql:
        _sql_header(settings)
        upgrade_sql(revision, sys.stdout, key_prefix=settings.key_prefix)
        return
    click.echo(using_line(settings, redis=False))
    run_upgrade(settings.database_url, revision, key_prefix=settings.key_prefix)
    click.echo(f"database schema at revision {current(settings.database_url)}")


@migrate.command()
@click.argument("revision")
@sql_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade(revision: str, sql: bool, yes: bool) -> None:
    """Downgrade to REVISION (`base` drops the tables and every session in them). With
    --sql, REVISION must be FROM:TO (`0005:0004`)."""
    from persistence.migrate import current, downgrade_sql
    from persistence.migrate import downgrade as run_downgrade

    settings = Settings()
    if sql:
        _sql_header(settings)
        downgrade_sql(revision, sys.stdout)
        return
    click.echo(using_line(settings, redis=False))
    if not yes:
        click.confirm(f"Downgrade the database schema to {revision}?", abort=True, err=True)
    run_downgrade(settings.database_url, revision)
    click.echo(f"database schema at revision {current(settings.database_url) or 'none'}")


@migrate.command("current")
def current_revision() -> None:
    """The database's revision, beside this build's newest."""
    from persistence.migrate import current, head

    settings = Settings()
    click.echo(using_line(settings, redis=False))
    found, newest = current(settings.database_url), head()
    if found == newest:
        click.echo(f"database schema at revision {found} (head)")
    else:
        what = found or "none (empty database)"
        click.echo(f"database schema at revision {what}; this build's head is {newest}")


@migrate.command()
def history() -> None:
    """Every revision this build ships, newest first."""
    from persistence.migrate import history as revisions

    for line in revisions():
        click.echo(line)


def _sql_header(settings: Settings) -> None:
    click.echo(
        f"-- agent-sessions migrate --sql: PostgreSQL, key prefix {settings.key_prefix} for "
        "rows that predate deployments (0005)"
    )

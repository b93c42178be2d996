"""persistence.schema reads the schema's revision without Alembic; its list of revisions must
be Alembic's own history of persistence/migrations."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from persistence.migrate import alembic_config, head
from persistence.schema import HEAD, REVISIONS


def test_the_revisions_are_alembics_history_oldest_first() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    history = [script.revision for script in scripts.walk_revisions()]
    assert tuple(reversed(history)) == REVISIONS
    assert head() == HEAD


def test_a_command_that_checks_the_schema_imports_no_alembic() -> None:
    import subprocess
    import sys

    code = (
        "import sys, workers.preflight, agent_sessions.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

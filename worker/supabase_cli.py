"""`ourvidz-worker supabase export`: the Supabase way to deploy our schema.

A team that keeps its schema in `supabase/migrations` and deploys it with `supabase db push`
copies our migrations into that folder, unchanged and under their own versions, and deploys them
with its own. `ourvidz-worker migrate` never writes the CLI's history on a Supabase project (see
worker.db.migration_history), so the two ways never break each other; once the CLI has applied
ours, `migrate` refuses to apply newer ones itself and points here.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from worker import db
from worker.config import Settings

# The Supabase CLI's own pattern for a migration file: <digits>_<name>.sql.
CLI_MIGRATION = re.compile(r"^([0-9]+)_(.*)\.sql$")

supabase_app = typer.Typer(no_args_is_help=True,
                           help="Deploy through a Supabase project's own supabase/migrations and CLI.")


class ExportConflict(Exception):
    """The project's folder holds a different file under one of our versions."""


@dataclass
class Export:
    folder: Path
    written: list[db.Migration] = field(default_factory=list)
    unchanged: list[db.Migration] = field(default_factory=list)


def export_migrations(migrations: Sequence[db.Migration], folder: Path, *, force: bool = False) -> Export:
    """Copy `migrations` into `folder` under their own names. Nothing is written when any of them
    conflicts: a file of the team's with one of our versions, or a copy of ours that was changed
    (overwritten with `force`)."""
    if folder.exists() and not folder.is_dir():
        raise ExportConflict(f"{folder} is not a folder")
    theirs: dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.sql")):
            match = CLI_MIGRATION.match(path.name)
            if match:
                theirs[match.group(1)] = path
    export = Export(folder)
    for migration in migrations:
        present = theirs.get(migration.version)
        if present is None:
            export.written.append(migration)
        elif present.name != migration.path.name:
            raise ExportConflict(f"{present} has version {migration.version}, which is {migration.path.name}'s; "
                                 "give that migration of yours a new version (the CLI needs each version once)")
        elif present.read_bytes() == migration.path.read_bytes():
            export.unchanged.append(migration)
        elif force:
            export.written.append(migration)
        else:
            raise ExportConflict(f"{present} differs from the ourvidz migration of that name; our migrations "
                                 "never change once released, so restore it (--force overwrites it)")
    folder.mkdir(parents=True, exist_ok=True)
    for migration in export.written:
        (folder / migration.path.name).write_bytes(migration.path.read_bytes())
    return export


def applied_by_migrate(url: str) -> list[str]:
    """Versions `ourvidz-worker migrate` recorded in its own history on this database."""
    with db.connect(url, connect_timeout=10) as conn:
        row = conn.execute("select to_regclass('ourvidz.schema_migrations') is not null as yes").fetchone()
        if not (row and row["yes"]):
            return []
        rows = conn.execute("select version from ourvidz.schema_migrations order by version").fetchall()
    return [r["version"] for r in rows]


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


@supabase_app.command("export")
def export_command(
    folder: Annotated[Path, typer.Option("--dir", help="The project's migrations folder.")] = Path(
        "supabase/migrations"),
    database_url: Annotated[str | None, typer.Option(
        help="The project's database: if `ourvidz-worker migrate` applied our migrations there, print the "
             "`supabase migration repair` command that tells the CLI.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite copies of our migrations that were changed.")] = False,
) -> None:
    """Write the ourvidz migrations into a Supabase project's supabase/migrations for `supabase db push`."""
    migrations = db.discover_migrations(Settings().migrations_dir)
    if not folder.exists() and not (folder.parent / "config.toml").exists():
        raise _fail(f"{folder} does not exist and {folder.parent} is no Supabase project (no config.toml): "
                    "run this in the project (after `supabase init`) or pass --dir")
    try:
        export = export_migrations(migrations, folder, force=force)
    except (ExportConflict, OSError) as err:
        raise _fail(str(err)) from None
    print(f"wrote {len(export.written)} of {len(migrations)} ourvidz migrations to {folder}"
          f" ({len(export.unchanged)} already there)")
    for migration in export.written:
        print(f"  {migration.path.name}")
    if database_url:
        try:
            applied = [v for v in applied_by_migrate(database_url) if v in {m.version for m in migrations}]
        except psycopg.ProgrammingError:  # its message may quote the URL, password and all
            raise _fail("--database-url is not a Postgres connection URL") from None
        except psycopg.Error as err:
            raise _fail(f"cannot read the project's database: {str(err).strip().splitlines()[0]}") from None
        if applied:
            print("`ourvidz-worker migrate` applied some of them to this project already; tell the CLI first:")
            print(f"  supabase migration repair --status applied {' '.join(applied)} --linked")
    elif export.written:
        print("if `ourvidz-worker migrate` ran on this project before, rerun with --database-url to get the "
              "`supabase migration repair` command that tells the CLI")
    print("then: supabase db push --linked   (add --include-all when the project already has a migration newer "
          "than one written here)")

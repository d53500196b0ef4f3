"""How the CLI ends: a person's mistake is one sentence on stderr and a non-zero exit, never a
traceback and never a secret. Exit 2: the command line or a setting is wrong; 1: it could not be
done (database unreachable or refusing, an unexpected error); 130: interrupted."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import psycopg
import typer
from pydantic import ValidationError

from worker import logs

USAGE, FAILED, INTERRUPTED = 2, 1, 130
VERBOSE_HINT = "run with --verbose for the traceback"
SECRET_ENV = ("DATABASE_URL", "OURVIDZ_DATABASE_URL", "OURVIDZ_LISTEN_DATABASE_URL",
              "SUPABASE_SERVICE_ROLE_KEY", "OURVIDZ_SUPABASE_SERVICE_ROLE_KEY")
ENV_NAMES = {"database_url": "DATABASE_URL", "supabase_url": "SUPABASE_URL",
             "supabase_service_role_key": "SUPABASE_SERVICE_ROLE_KEY"}
NOT_MIGRATED = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)


class CliError(Exception):
    """A sentence for the person at the terminal, and the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def url_secrets(url: str | None) -> list[str]:
    """The password of a Postgres URL or key=value string, read leniently: libpq quotes a malformed
    URL whole in its error, so this must work where the URL does not parse."""
    if not url:
        return []
    found: list[str] = []
    scheme = r"[A-Za-z][A-Za-z0-9+.-]*://" if "://" in url or "=" in url else ""  # or user:password@host
    if match := re.match(rf"^\s*{scheme}([^/?#\s]*)@", url):
        _user, sep, password = match.group(1).partition(":")
        if sep and password:
            found += [password, unquote(password)]
    for quoted, bare in re.findall(r"password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S+))", url):
        found.append(quoted or bare)
    return [s for s in found if s]


def hide_secrets_from_env() -> None:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        logs.hide(*(url_secrets(value) if "URL" in name else [value]))


def connection_error(err: psycopg.Error, connect_timeout: float) -> CliError:
    """Why a connection could not be made, from libpq's own first line."""
    if isinstance(err, psycopg.ProgrammingError):  # the URL itself: libpq quotes it, password and all
        return CliError("DATABASE_URL is not a valid Postgres URL (postgresql://USER:PASSWORD@HOST:5432/DBNAME): "
                        f"{_first_line(err)}", USAGE)
    line = _first_line(err).removeprefix("connection failed: ").removeprefix("connection is bad: ")
    if "timeout expired" in line:
        line += f" (no answer within {connect_timeout:g} s; OURVIDZ_DB_CONNECT_TIMEOUT)"
    return CliError(f"cannot connect to the database: {line}")


def explain(err: BaseException) -> CliError:
    """One sentence for an exception a command let through."""
    if isinstance(err, CliError):
        return err
    if isinstance(err, typer.TyperException):  # the command line: Typer's (vendored) click errors
        ctx = getattr(err, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None and err.exit_code == USAGE else ""
        return CliError(err.format_message() + see, err.exit_code)
    if isinstance(err, ValidationError) and err.title == "Settings":
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        env = ENV_NAMES.get(field, f"OURVIDZ_{field.upper()}")
        return CliError(f"invalid setting {field} ({env}): {first['msg']}", USAGE)  # never the value: a secret
    if isinstance(err, psycopg.OperationalError):
        return CliError(f"lost the database: {_first_line(err).removeprefix('connection failed: ')}")
    if isinstance(err, NOT_MIGRATED):
        return CliError(f"the database is not migrated ({_primary(err)}): run `ourvidz-worker migrate` first")
    if isinstance(err, psycopg.DatabaseError) and err.diag.message_primary:
        hint = f" ({err.diag.message_hint})" if err.diag.message_hint else ""
        return CliError(f"the database refused it: {err.diag.message_primary}{hint}")
    if isinstance(err, KeyboardInterrupt):
        return CliError("interrupted", INTERRUPTED)
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return CliError(f"{err.strerror}{where}")
    return CliError(f"unexpected {type(err).__name__}: {_first_line(err) or 'no message'} ({VERBOSE_HINT})")


def run_cli(command: Callable[[], Any], args: list[str], verbose: Callable[[], bool]) -> int:
    """Run the command `command()` builds with `args`: its exit code, or the sentence for what went
    wrong (and its traceback only with --verbose)."""
    hide_secrets_from_env()
    try:
        result: Any = command().main(args, prog_name="ourvidz-worker", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BaseException as err:  # every way out becomes a sentence
        if isinstance(err, SystemExit):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # no command given: the help, as --help shows it
            print(str(err.format_message()))  # type: ignore[attr-defined]
            return USAGE
        problem = explain(err)
        if verbose() and not isinstance(err, CliError | typer.TyperException):
            print(logs.redact("".join(traceback.format_exception(err))), file=sys.stderr, end="")
        print(logs.redact(f"error: {problem.message}"), file=sys.stderr)
        return problem.code
    return result if isinstance(result, int) else 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else ""


def _primary(err: psycopg.Error) -> str:
    return err.diag.message_primary or _first_line(err)

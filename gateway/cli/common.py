"""What every `clinphoto` command shares: the consoles, the settings, opening the store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.console import Console

from gateway.core.context import Gateway
from gateway.settings import Settings, SettingsError, load_settings, unknown_env_names

console = Console(stderr=True)
out = Console()
# set by `clinphoto -v ...`: every command then says which data directory and database it used
verbose = False
# the largest id a row can have (SQLite INTEGER, PostgreSQL bigint): a larger number typed as an id was passed to the
# driver and came back as a traceback (OverflowError: Python int too large to convert to SQLite INTEGER)
MAX_ID = 2**63 - 1


def say(text: str) -> None:
    """One line for the operator on stderr (never markup: paths and identifiers are printed as they are)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest value, the last one left free: one line per row whatever the terminal's
    width (a pipe to grep or less must not see rows folded)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    for line in [header, *rows]:
        print(("  ".join(v.ljust(w) for v, w in zip(line[:-1], widths)) + "  " + line[-1]).rstrip())


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        console.print(f"clinphoto: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for name in unknown_env_names():
        say(f"clinphoto: warning: {name} is not a setting (misspelt?); ignored")
    if verbose:
        say(f"clinphoto: data directory {Path(settings.data_dir).resolve()}, database {settings.database_url.split('@')[-1]}")
    return settings


def existing_data_dir(settings: Settings) -> None:
    """Exit (2) unless the data directory exists: a command run from another folder would otherwise make an
    empty store there and report on it (0 audit records, "clean") or mint tokens no gateway accepts."""
    where = Path(settings.data_dir).resolve()
    if where.is_dir():
        return
    source = "CLINPHOTO_DATA_DIR" if os.environ.get("CLINPHOTO_DATA_DIR") else f"the default ./var under {Path.cwd()}"
    say(f"clinphoto: no data directory at {where} ({source}). Run clinphoto from the folder `make run` was started in "
        "(the repository folder), or set CLINPHOTO_DATA_DIR to the gateway's data directory; only `clinphoto serve`, "
        "`clinphoto demo` and `clinphoto db upgrade` create a new one.")
    raise typer.Exit(2)


def open_gateway(migrate: bool = True, tidy: bool = True, settings: Settings | None = None, create: bool = False) -> Gateway:
    """The store, opened as `clinphoto serve` opens it; any failure is one line and exit status 2. Only the commands
    that set a gateway up (serve, demo, db upgrade) pass create=True: the others refuse a missing data directory."""
    settings = settings or settings_or_exit()
    if not create:
        existing_data_dir(settings)
    try:
        return Gateway.open(settings, migrate=migrate, tidy=tidy)
    except Exception as exc:
        where = settings.database_url.split("@")[-1]  # never the password
        say(f"clinphoto: cannot open the store at {where}: {' '.join(str(exc).split())[:300]}")
        raise typer.Exit(2) from None


def operator_name() -> str:
    """The OS account running a command, as every CLI audit record names it (os:NAME), so `audit list --user os:NAME`
    finds all of one operator's actions: the commands once named it three ways (root, os:root, cli:root)."""
    import getpass

    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"os:uid:{os.getuid()}"

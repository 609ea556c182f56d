"""What every `clinphoto` command shares: the consoles, the settings, opening the store."""

from __future__ import annotations

import typer
from rich.console import Console

from gateway.core.context import Gateway
from gateway.settings import Settings, SettingsError, load_settings, unknown_env_names

console = Console(stderr=True)
out = Console()


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        console.print(f"clinphoto: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for name in unknown_env_names():
        console.print(f"clinphoto: warning: {name} is not a setting (misspelt?); ignored", markup=False, highlight=False, soft_wrap=True)
    return settings


def open_gateway(migrate: bool = True, tidy: bool = True, settings: Settings | None = None) -> Gateway:
    """The store, opened as `clinphoto serve` opens it; any failure is one line and exit status 2."""
    settings = settings or settings_or_exit()
    try:
        return Gateway.open(settings, migrate=migrate, tidy=tidy)
    except Exception as exc:
        where = settings.database_url.split("@")[-1]  # never the password
        console.print(f"clinphoto: cannot open the store at {where}: {' '.join(str(exc).split())[:300]}", markup=False,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

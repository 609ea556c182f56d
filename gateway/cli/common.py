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
        raise typer.Exit(2)
    for name in unknown_env_names():
        console.print(f"clinphoto: warning: {name} is not a setting (misspelt?); ignored", markup=False, highlight=False, soft_wrap=True)
    return settings


def open_gateway(migrate: bool = True, tidy: bool = True) -> Gateway:
    settings = settings_or_exit()
    try:
        return Gateway.open(settings, migrate=migrate, tidy=tidy)
    except Exception as exc:
        console.print(f"clinphoto: cannot open the store at {settings.database_url.split('@')[-1]}: {' '.join(str(exc).split())[:300]}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

"""The command line wing: typer commands over the engine's API (commands.py), their options (options.py), and what
they show (render.py). The only wing that prints or exits.

Imports: cli.commands.
"""

from __future__ import annotations

from fp8q.cli.commands import app, main

__all__ = ["app", "main"]

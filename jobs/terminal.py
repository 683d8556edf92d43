"""What every command prints to the terminal: messages on stderr, and how a command fails."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

# stderr keeps stdout for results; soft_wrap keeps paths and messages copy-pasteable.
console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Prints `error: message` and returns the Exit to raise: 2 bad arguments, 1 job failure."""
    # Text, not markup: messages hold paths, ids and exception text, brackets included.
    console.print(Text.assemble(("error:", "bold red"), " ", message))
    return typer.Exit(code)

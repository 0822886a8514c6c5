"""Console output: quiet by default, commands shown with --verbose, progress for long steps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console


@dataclass
class UI:
    """Process-wide output settings, set once by the CLI (tests use the defaults)."""

    verbose: bool = False
    quiet: bool = False
    json: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))
    timings: list[tuple[str, float]] = field(default_factory=list)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg)

    def debug(self, msg: str) -> None:
        if self.verbose:
            self.console.print(f"[dim]{msg}[/dim]", markup=True, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A named, timed step with a spinner; the time is kept for the build summary."""
        start = time.monotonic()
        if self.quiet or self.verbose or not self.console.is_terminal:
            if not self.quiet:
                self.console.print(f"[bold]•[/bold] {title} …")
            yield
        else:
            with self.console.status(title):
                yield
        elapsed = time.monotonic() - start
        self.timings.append((title, elapsed))
        if not self.quiet:
            self.console.print(f"  [green]✓[/green] {title} [dim]({elapsed:.1f} s)[/dim]")


ui = UI()

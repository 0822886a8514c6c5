"""The error types the CLI turns into short, actionable messages instead of tracebacks."""

from __future__ import annotations

from collections.abc import Sequence


class ParticleError(Exception):
    """Base class: anything a user can act on. The CLI prints `str(err)` and exits `exit_code`;
    `hint` (what to run or change) follows on its own `hint: ...` line(s)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SpecError(ParticleError):
    """One or more problems in a spec; each problem is one line `FILE: key.path: message`."""

    exit_code = 2

    def __init__(self, problems: list[str], *, hints: Sequence[str] = ()) -> None:
        self.problems = problems
        unique = list(dict.fromkeys(hints))
        super().__init__("\n".join(problems), hint="\n".join(unique) or None)


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a build: unwinds like KeyboardInterrupt (cleanup runs), is not
    caught by `except Exception`, and the CLI exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class CommandError(ParticleError):
    """An external command failed; carries what the user needs to see (command, stderr tail)."""

    def __init__(self, what: str, argv: list[str], returncode: int, stderr: str) -> None:
        self.what = what
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join("    " + line for line in stderr.strip().splitlines()[-12:])
        msg = f"{what} failed (exit status {returncode})\n  command: {_quote(argv)}"
        if tail:
            msg += f"\n  last lines of its output:\n{tail}"
        super().__init__(msg)


class MissingToolError(ParticleError):
    """A host program is missing; names the Debian package that provides it."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"required program '{tool}' was not found; install it with: apt-get install {package}"
        )


def _quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)

"""`python -m particleos`: the same entry point as the `particle` command."""

from .cli import main

main()

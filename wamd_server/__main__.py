"""`python -m wamd_server …` is `wamd-server …` (how the supervisor starts its worker processes)."""

from wamd_server.cli import main

main()

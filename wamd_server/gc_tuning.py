"""Garbage-collector settings for the long-running server processes (`serve`, `api`, `worker`).

A broadcast allocates a few dozen short-lived objects per message. With Python's default thresholds (700, 10, 10)
that meant thousands of young collections and a full collection every few seconds, each walking every object the
process holds (thousands of device sessions, SQLAlchemy's metadata, the loaded plugins): in bench/dispatch.py a
third of the server's CPU went to the collector. Objects made during start-up live as long as the process, so they
are frozen out of collections, and young collections run less often.
"""

from __future__ import annotations

import gc

# Young objects between collections, and collections of one generation per collection of the next.
SERVER_THRESHOLDS = (50_000, 20, 10)


def tune_for_server() -> None:
    gc.set_threshold(*SERVER_THRESHOLDS)


def freeze_startup_objects() -> None:
    """After start-up: move every object alive now out of the collector's reach (it is still freed normally when
    its reference count drops to zero)."""
    gc.collect()
    gc.freeze()

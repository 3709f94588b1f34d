"""A rollout test's tool with a side effect (tests/flows/test_rollout.py): each call
appends a token naming its process and call to the file `TALLY_FILE` names, and returns
that token, so a test can tell which calls ran in which run and which results a
conversation's trajectory kept."""

from __future__ import annotations

import itertools
import os
import threading

_calls = itertools.count()
_lock = threading.Lock()


def lookup(city: str) -> str:
    """Looks a city up."""
    with _lock:
        token = f"{os.getpid()}:{next(_calls)}"
        with open(os.environ["TALLY_FILE"], "a") as f:
            f.write(f"{token} {city}\n")
    return f"looked up {city}: {token}"

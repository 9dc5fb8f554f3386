"""Several verifiers behind one server: where a request's session goes, and where a lost one resumes.

`dovetail serve --verifier A --verifier B ...` keeps ``--parallel`` Clients (one verifier session each)
per verifier and one shared draft for all of them, so the draft forwards of every session on every
verifier batch together. A session stays on its verifier for its whole life (its KV cache lives
there). A request takes the idle Client whose verifier runs the fewest requests (a verifier that
stopped answering comes last); a Client whose link died resumes on the live verifier holding the
fewest sessions, by prefilling what it committed (``Client._resume``). A verifier that stopped
answering is offered again after ``RETRY_S`` (if it is still dead, the next resume marks it again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger(__name__)

RETRY_S = 30.0


def endpoint_of(client) -> str | None:
    """Where ``client``'s session lives now (None: its link is closed)."""
    conn = getattr(client, "conn", None)
    return conn.endpoint if conn is not None else None


class VerifierPool:
    """The verifiers' state as the server sees it: requests running on each, and which stopped answering."""

    def __init__(self, endpoints: list[str], retry_s: float = RETRY_S):
        self.endpoints = list(endpoints)
        self.retry_s = retry_s
        self.running: Counter = Counter()  # endpoint -> requests running there
        self.down: dict[str, float] = {}  # endpoint -> when a link to it died
        self.at: dict[int, str | None] = {}  # id(Client) -> the verifier its running request started on
        self.lock = threading.Lock()  # resumes come from the requests' worker threads

    def is_down(self, endpoint: str | None) -> bool:
        since = self.down.get(endpoint)
        return since is not None and time.monotonic() - since < self.retry_s

    def pick(self, idle: list) -> int:
        """Which idle Client a new request takes (an index into ``idle``): the one on the verifier that
        runs the fewest requests, a down verifier's last; among equals the most recently freed."""
        return min(range(len(idle)), key=lambda i: (self.is_down(endpoint_of(idle[i])),
                                                     self.running[endpoint_of(idle[i])], -i))

    def started(self, client) -> None:
        """A request took ``client``: it runs on the client's verifier."""
        with self.lock:
            self.at[id(client)] = endpoint = endpoint_of(client)
            self.running[endpoint] += 1

    def finished(self, client) -> None:
        """``client``'s request ended (counted where it started, even if its session moved since)."""
        with self.lock:
            endpoint = self.at.pop(id(client), None)
            self.running[endpoint] = max(0, self.running[endpoint] - 1)

    def elsewhere(self, client, clients: list) -> str:
        """``client``'s link died: its verifier is marked down, and its session resumes on the live verifier
        that holds the fewest sessions (its own again if every other one is down)."""
        with self.lock:
            lost = endpoint_of(client)
            if lost is not None:
                self.down[lost] = time.monotonic()
            held = Counter(endpoint_of(c) for c in clients if c is not client)
            live = [e for e in self.endpoints if not self.is_down(e)] or [lost or self.endpoints[0]]
            target = min(live, key=lambda e: (held[e], self.endpoints.index(e)))
            if target != lost:
                log.warning("verifier %s stopped answering: a session resumes on %s", lost, target)
            return target

    def report(self, clients: list) -> list[dict]:
        """Per verifier: its state, the sessions held there and the requests running."""
        held = Counter(endpoint_of(c) for c in clients)
        return [{"endpoint": e, "state": "down" if self.is_down(e) else "ok", "sessions": held[e],
                 "running": self.running[e]} for e in self.endpoints]

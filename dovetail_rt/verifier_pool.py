"""Several verifiers behind one server: where a request's session goes, and where a lost one resumes.

`dovetail serve --verifier A --verifier B ...` keeps ``--parallel`` Clients (one verifier session each)
per verifier and one shared draft for all of them, so the draft forwards of every session on every
verifier batch together. A session stays on its verifier for its whole life (its KV cache lives
there). A request takes the idle Client whose verifier would run it soonest: the fewest requests, each
weighted by the verifier's one-token step (T_V(1) of the curve its WELCOME sent, so a host twice as
fast takes twice the sessions; a verifier that sent none weighs the median of those that did), a
verifier that stopped answering last; unless a verifier within the fair share (``ceil(running / live)``,
this request counted) holds a finished sequence that starts like the request's prompt for
``MIN_PREFIX`` tokens more than the least loaded one's does (a chat template or system prompt that
every verifier holds decides nothing): its prefix cache saves the prefill (a chat's next turn goes
where its history is). Both hold for a request that finds an idle Client; one that waits takes the
first Client freed (first come, first served). The pool remembers the last ``HELD`` finished sequences per verifier (a verifier's
prefix cache keeps at most 32 states): a hint, since the verifier may have evicted one meanwhile.
A Client whose link died resumes on the live verifier holding the fewest sessions, by prefilling what
it committed (``Client._resume``). A verifier that stopped answering is offered again after ``RETRY_S``
(if it is still dead, the next resume marks it again).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter, defaultdict, deque

from .drafter import common_prefix

log = logging.getLogger(__name__)

RETRY_S = 30.0
HELD = 32  # finished sequences remembered per verifier (its prefix cache keeps at most 32 states)
MIN_PREFIX = 16  # shared tokens that make a verifier's cache worth more than the least loaded one


def step_times(endpoints: list[str], curves: dict[str, dict]) -> dict[str, float]:
    """Each verifier's one-token step (seconds, T_V(1) of the curve its WELCOME sent); one that sent
    none weighs the median of those that did (all alike when none did)."""
    known = {e: float(c[1]) for e, c in curves.items() if c and 1 in c}
    default = statistics.median(known.values()) if known else 1.0
    return {e: known.get(e, default) for e in endpoints}


def endpoint_of(client) -> str | None:
    """Where ``client``'s session lives now (None: its link is closed)."""
    conn = getattr(client, "conn", None)
    return conn.endpoint if conn is not None else None


class VerifierPool:
    """The verifiers' state as the server sees it: requests running on each, and which stopped answering."""

    def __init__(self, endpoints: list[str], retry_s: float = RETRY_S):
        self.endpoints = list(endpoints)
        self.step_s = step_times(self.endpoints, {})  # endpoint -> T_V(1) (``learn``)
        self.retry_s = retry_s
        self.running: Counter = Counter()  # endpoint -> requests running there
        self.down: dict[str, float] = {}  # endpoint -> when a link to it died
        self.at: dict[int, str | None] = {}  # id(Client) -> the verifier its running request started on
        self.held: dict[str, deque] = defaultdict(lambda: deque(maxlen=HELD))  # endpoint -> finished sequences
        self.lock = threading.Lock()  # resumes come from the requests' worker threads

    def learn(self, curves: dict[str, dict]) -> None:
        """The verification curve each verifier sent in its WELCOME ({endpoint: {q: seconds}})."""
        self.step_s = step_times(self.endpoints, curves)

    def is_down(self, endpoint: str | None) -> bool:
        since = self.down.get(endpoint)
        return since is not None and time.monotonic() - since < self.retry_s

    def pick(self, idle: list, prompt: list[int] | None = None) -> int:
        """Which idle Client a new request takes (an index into ``idle``): the one on the verifier whose
        running requests, this one counted, take the least time (T_V(1) each), a down verifier's last, among
        equals the most recently freed; but one on a verifier within the fair share that holds
        ``MIN_PREFIX`` more of ``prompt`` than that one's comes first. On the event loop only."""
        def load(i: int) -> float:
            return (self.running[endpoint_of(idle[i])] + 1) * self.step_s.get(endpoint_of(idle[i]), 1.0)

        least = min(range(len(idle)), key=lambda i: (self.is_down(endpoint_of(idle[i])), load(i), -i))
        live = [e for e in self.endpoints if not self.is_down(e)]
        if not prompt or len(live) < 2:
            return least
        fair = math.ceil((sum(self.running[e] for e in live) + 1) / len(live))
        room = [i for i in range(len(idle)) if endpoint_of(idle[i]) in live and self.running[endpoint_of(idle[i])] < fair]
        shared = {e: self.cached_prefix(e, prompt) for e in {endpoint_of(idle[i]) for i in room + [least]}}
        best = max(room, key=lambda i: (shared[endpoint_of(idle[i])], -load(i), i), default=None)
        if best is not None and shared[endpoint_of(idle[best])] >= shared[endpoint_of(idle[least])] + MIN_PREFIX:
            return best
        return least

    def cached_prefix(self, endpoint: str, prompt: list[int]) -> int:
        """The longest start of ``prompt`` that a sequence finished on ``endpoint`` shares."""
        return max((common_prefix(seq, prompt) for seq in self.held.get(endpoint, ())), default=0)

    def started(self, client) -> None:
        """A request took ``client``: it runs on the client's verifier."""
        with self.lock:
            self.at[id(client)] = endpoint = endpoint_of(client)
            self.running[endpoint] += 1

    def finished(self, client, sequence: list[int] | None = None) -> None:
        """``client``'s request ended (counted where it started, even if its session moved since);
        ``sequence`` (its prompt and output) is now in the prefix cache of the verifier holding the session
        (None: its state did not get there)."""
        with self.lock:
            endpoint = self.at.pop(id(client), None)
            self.running[endpoint] = max(0, self.running[endpoint] - 1)
            where = endpoint_of(client)
            if sequence and where is not None:
                self.held[where].appendleft(list(sequence))

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

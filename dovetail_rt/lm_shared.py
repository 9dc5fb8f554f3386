"""One opened LM shared by threads, their forwards batched: the server's draft model.

The server runs each request's Client in its own worker thread, and every Client drafts with the same
opened draft LM. Wrapped in :class:`SharedLM`, a session's ``forward`` that arrives while another
forward runs waits, and the waiting forwards of all threads then run as ONE ``forward_batch`` (the
leader is the first waiting thread; no thread of its own). The leader waits a moment (``gather_s``,
2 ms) for as many forwards as the last pass held, so threads in step stay in one pass; a forward
alone runs at once. So N requests drafting together cost about one draft pass per draft step, not N.

Batching changes no output: a draft only proposes, and the verifier keeps what the target would
have produced. ``keep`` / ``truncate`` / ``close`` go straight to the engine session (its owner's
thread is the only one that touches it, and it is never in a pass then).
"""

from __future__ import annotations

import threading
import time

from .lm import Output


GATHER_S = 0.002  # see SharedLM._gather


class _Job:
    __slots__ = ("item", "result", "done")

    def __init__(self, item):
        self.item, self.result, self.done = item, None, False


class SharedLM:
    """The ``lm.LM`` seam over an engine whose ``forward_batch`` runs several sessions in one pass."""

    def __init__(self, inner, gather_s: float = GATHER_S):
        """``gather_s``: how long a pass's leader may wait for the threads of the last pass to queue again."""
        self.inner, self.info, self.gather_s = inner, inner.info, gather_s
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []
        self._running = False
        self.passes = 0  # engine passes run
        self.forwards = 0  # session forwards they held
        self.last_batch = 0  # forwards in the last pass

    def session(self, features: bool = False) -> "SharedSession":
        return SharedSession(self, self.inner.session(features))

    def forward_batch(self, items: list) -> list:
        return self.inner.forward_batch([(s.inner, *rest) for s, *rest in items])

    def close(self) -> None:
        self.inner.close()

    def run(self, item: tuple) -> Output:
        """One session's forward, in the next pass with every other thread's that waits for it."""
        job = _Job(item)
        with self._cond:
            self._waiting.append(job)
            self._cond.notify_all()  # a leader gathering counts the waiting forwards
            while True:
                while self._running and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                self._running = True  # this thread leads the next pass: everything waiting then
                self._gather()
                batch, self._waiting = self._waiting, []
                self._cond.release()
                results: list = [RuntimeError("the draft pass did not finish")] * len(batch)
                try:
                    results = self._pass(batch)
                finally:  # whatever happened, every job of the pass ends or waits again, and the others wake
                    self._cond.acquire()
                    self._running = False
                    again = [queued for queued, result in zip(batch, results) if result is None]
                    for queued, result in zip(batch, results):
                        if result is not None:
                            queued.result, queued.done = result, True
                    self._waiting = again + self._waiting  # no room in that pass (rows, sequence ids): first next
                    self._cond.notify_all()
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def _gather(self) -> None:
        """Wait (at most ``gather_s``) until as many forwards wait as the last pass held: the threads it
        answered are back with their next draft step after a little Python (keep, sizing), and one
        pass for all of them beats a pass for the first and another for the rest (measured on a GPU:
        NOTES.md). A thread drafting alone never waits; the window is lost only when some stop drafting."""
        deadline = time.monotonic() + self.gather_s
        while len(self._waiting) < self.last_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

    def _pass(self, batch: list[_Job]) -> list:
        try:
            if len(batch) == 1:  # alone: the session's own forward (an engine's chain path, prefill chunking)
                session, tokens, parents, logits_for = batch[0].item
                results = [session.forward(tokens, parents, logits_for)]
            else:
                results = self.inner.forward_batch([job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the engine answered {len(results)} of {len(batch)} forwards")
        except Exception as exc:  # an engine failure is every waiting forward's error
            results = [exc] * len(batch)
        self.passes += 1
        self.forwards += len(batch)
        self.last_batch = len(batch)
        return results


class SharedSession:
    """An engine session whose forwards go through its :class:`SharedLM`'s passes."""

    def __init__(self, owner: SharedLM, inner):
        self.owner, self.inner = owner, inner

    @property
    def length(self) -> int:
        return self.inner.length

    def forward(self, tokens: list[int], parents: list[int] | None = None, logits_for: int | None = None) -> Output:
        return self.owner.run((self.inner, tokens, parents, logits_for))

    def keep(self, path: list[int]) -> None:
        self.inner.keep(path)

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)

    def close(self) -> None:
        self.inner.close()

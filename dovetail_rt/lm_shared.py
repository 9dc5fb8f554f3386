"""One opened LM shared by threads, their forwards batched: the server's draft model.

The server runs each request's Client in its own worker thread, and every Client drafts with the same
opened draft LM. Wrapped in :class:`SharedLM`, a session's ``forward`` that arrives while another
forward runs waits, and the waiting forwards of all threads then run as ONE ``forward_batch`` (the
leader is the first waiting thread; no thread of its own, no timer: a forward alone runs at once).
So N requests drafting together cost about one draft pass per draft step, not N.

Batching changes no output: a draft only proposes, and the verifier keeps what the target would
have produced. ``keep`` / ``truncate`` / ``close`` go straight to the engine session (its owner's
thread is the only one that touches it, and it is never in a pass then).
"""

from __future__ import annotations

import threading

from .lm import Output


class _Job:
    __slots__ = ("item", "result", "done")

    def __init__(self, item):
        self.item, self.result, self.done = item, None, False


class SharedLM:
    """The ``lm.LM`` seam over an engine whose ``forward_batch`` runs several sessions in one pass."""

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info
        self.tokenizer = getattr(inner, "tokenizer", None)
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
            while True:
                while self._running and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                self._running = True  # this thread leads the next pass: everything waiting now
                batch, self._waiting = self._waiting, []
                self._cond.release()
                try:
                    results = self._pass(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                for waiting, result in zip(batch, results):
                    if result is None:  # no room in that pass (engine batch rows, sequence ids): the next one
                        self._waiting.append(waiting)
                    else:
                        waiting.result, waiting.done = result, True
                self._cond.notify_all()
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def _pass(self, batch: list[_Job]) -> list:
        try:
            if len(batch) == 1:  # alone: the session's own forward (an engine's chain path, prefill chunking)
                session, tokens, parents, logits_for = batch[0].item
                results = [session.forward(tokens, parents, logits_for)]
            else:
                results = self.inner.forward_batch([job.item for job in batch])
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

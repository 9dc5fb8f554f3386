"""`dovetail serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of a verifier.

    POST /v1/chat/completions   POST /v1/completions   (streaming: SSE, then data: [DONE])
    GET  /v1/models   GET /health (503 while loading or when the verifier is gone)   GET /metrics
    GET  /   a chat page (static, no build step) that shows tokens/s, tau and acceptance per reply

Why FastAPI + uvicorn: the OpenAI client, llama.cpp's and vLLM's servers all speak plain HTTP + SSE,
and FastAPI gives request validation (pydantic) and streaming responses on one asyncio loop; what
blocks (a verifier round trip, a draft forward) runs in one worker thread per running request.

Concurrency: ``--parallel`` Clients (each one verifier session, all sharing the one opened draft
model and, for lookup drafts, one index of earlier outputs) are a pool; a request takes one, or
waits in a queue of at most ``--queue`` requests, served first come first served (past it: 503
with Retry-After). A client that
disconnects stops its generation after the step in flight, and its session serves the next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.background import BackgroundTask
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from . import grammar, tools
from . import openai_api as api
from .config import ServeConfig
from .verifier_pool import VerifierPool, endpoint_of

log = logging.getLogger(__name__)
PUBLIC = {"/", "/health", "/metrics"}  # routes open without the API key


class Unavailable(Exception):
    def __init__(self, message: str, status: int = 503, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Metrics:
    """Prometheus counters, gauges and histograms (vLLM's and llama.cpp's names, prefix ``dovetail:``)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("dovetail:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("dovetail:generation_tokens", "Tokens generated", registry=r)
        self.drafts = Counter("dovetail:spec_decode_num_drafts", "Verification steps that had a draft", registry=r)
        self.draft_tokens = Counter("dovetail:spec_decode_num_draft_tokens", "Draft tokens sent", registry=r)
        self.accepted_tokens = Counter("dovetail:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter("dovetail:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by draft position (0 = first)", ["position"], registry=r)
        self.restarts = Counter("dovetail:verifier_restarts", "Times the verifier child died and was restarted",
                                registry=r)
        self.success = Counter("dovetail:requests_success", "Finished requests", ["finished_reason"], registry=r)
        self.running = Gauge("dovetail:requests_running", "Requests generating", registry=r)
        self.waiting = Gauge("dovetail:requests_waiting", "Requests waiting for a slot", registry=r)
        self.ttft = Histogram("dovetail:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.per_token = Histogram("dovetail:time_per_output_token_seconds", "Decode time per generated token",
                                   registry=r, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.verify = Histogram("dovetail:verify_pass_seconds", "One verifier pass, by sessions in the pass",
                                ["batch"], registry=r, buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
        self.verifier_up = Gauge("dovetail:verifier_up", "1 while a verifier answers, 0 while it is avoided as down",
                                 ["endpoint"], registry=r)
        self.verifier_sessions = Gauge("dovetail:verifier_sessions", "Sessions held on a verifier", ["endpoint"], registry=r)
        self.verifier_running = Gauge("dovetail:verifier_running", "Requests running on a verifier", ["endpoint"],
                                      registry=r)

    def watch_verifiers(self, report: list[dict]) -> None:
        """Each verifier's state, sessions and running requests (``VerifierPool.report``), set at a scrape."""
        for v in report:
            self.verifier_up.labels(endpoint=v["endpoint"]).set(1 if v["state"] == "ok" else 0)
            self.verifier_sessions.labels(endpoint=v["endpoint"]).set(v["sessions"])
            self.verifier_running.labels(endpoint=v["endpoint"]).set(v["running"])

    def watch_draft(self, draft) -> None:
        """Export a shared draft LM's pass counts (read at each scrape)."""
        from prometheus_client import Gauge

        from .lm_shared import SharedLM

        if isinstance(draft, SharedLM):
            Gauge("dovetail:draft_passes", "Draft model passes run (each holds one or more requests' forwards)",
                  registry=self.registry).set_function(lambda: draft.passes)
            Gauge("dovetail:draft_forwards", "Draft forwards of all requests; / draft_passes = mean batch",
                  registry=self.registry).set_function(lambda: draft.forwards)

    def step(self, before: tuple, stats) -> tuple:
        """Count one verification step from the stats before and after it."""
        n_steps, n_drafted, n_accepted, verify_s = before
        drafted, accepted = stats.n_drafted - n_drafted, stats.n_accepted - n_accepted
        if stats.n_steps > n_steps:
            self.verify.labels(batch=str(stats.last_batch)).observe(stats.timings.verify_s - verify_s)
            if drafted:
                self.drafts.inc()
                self.draft_tokens.inc(drafted)
                self.accepted_tokens.inc(accepted)
                for pos in range(accepted):
                    self.accepted_per_pos.labels(position=str(pos)).inc()
        return snapshot(stats)


def snapshot(stats) -> tuple:
    return stats.n_steps, stats.n_drafted, stats.n_accepted, stats.timings.verify_s


class Backend:
    """The verifier (child or remote ones), the shared draft and the pool of Clients (``--parallel`` per
    verifier; with several, ``verifier_pool.VerifierPool`` places requests and resumes lost sessions).

    A verifier child that dies is restarted by a supervisor thread (after 1, 2, 4, 8, 16 s, at most
    ``RESTARTS`` times in ``RESTART_WINDOW_S``): the requests in flight get an error that says why it
    died, /health is 503 ("restarting") meanwhile, and the Clients resume on the new child at their
    next request (their link to the old one is dead, so they reopen at ``_reconnect()``)."""

    RESTARTS, RESTART_WINDOW_S = 5, 600.0

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.state, self.problem = "loading", "the models are loading"
        self.closing = threading.Event()
        self.restarts, self.last_death = 0, ""
        self.child, self.clients = None, []
        self.pool = VerifierPool(list(config.verifiers))  # with a child: its endpoint, once it runs
        self.idle: list = []  # Clients free now (touched on the event loop only)
        self.waiters: deque[asyncio.Future] = deque()  # requests waiting for one, first come first served
        self.tokenizer, self.model_id, self.max_positions = None, config.model, 1 << 30
        self.fingerprint = ""  # system_fingerprint: what serves (set at load)

    def start(self) -> None:
        """In the thread that lives as long as the server (the verifier child dies with it): start the
        verifier child, without waiting for it."""
        from .launcher import VerifierChild

        if self.config.child is not None:
            self.child = VerifierChild(self.config.child, self.config.placement, wait=False)

    def _reconnect(self, client) -> str:
        """Where a Client reopens a lost session: with one remote verifier its endpoint (it may have
        restarted there), with several the live one holding the fewest sessions, else the verifier child's
        current one; while the child is dead or restarting, the request fails now with why it died (and
        /health says it is restarting)."""
        if self.child is None:
            if len(self.pool.endpoints) == 1:
                return self.pool.endpoints[0]
            return self.pool.elsewhere(client, self.clients)
        from .transport import LinkError

        if self.child.exited() or self.state != "ready":
            raise LinkError(self.problem if self.state == "restarting" else self.child.death_report())
        return self.child.endpoint

    def _supervise(self) -> None:
        """In its own thread for the server's life (a child dies with the thread that started it):
        restart the verifier child each time it dies, with backoff and a limit per window."""
        deaths: deque[float] = deque()
        while not self.closing.is_set():
            self.child.proc.wait()
            if self.closing.is_set():
                return
            report, now = self.child.death_report(), time.monotonic()
            deaths.append(now)
            while deaths and now - deaths[0] > self.RESTART_WINDOW_S:
                deaths.popleft()
            self.last_death = report
            if len(deaths) > self.RESTARTS:
                self.state, self.problem = "failed", (f"the verifier died {len(deaths)} times in "
                                                      f"{self.RESTART_WINDOW_S / 60:.0f} minutes: not restarting it "
                                                      f"again; the last time: {report}")
                log.error("%s", self.problem)
                return
            backoff = 2.0 ** (len(deaths) - 1)
            self.state, self.problem = "restarting", f"restarting the verifier in {backoff:.0f} s: {report}"
            log.error("%s", self.problem)
            if self.closing.wait(backoff):
                return
            try:
                self.child.restart()
            except Exception as exc:  # it died before it listened, or could not start: the loop sees it dead
                log.error("the verifier restart failed: %s", exc)
                if self.child.proc.poll() is None:
                    self.child.stop()
                continue
            self.restarts += 1
            self.metrics.restarts.inc()
            self.state, self.problem = "ready", ""
            log.warning("the verifier is back at %s (restart %d)", self.child.endpoint, self.restarts)

    def load(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking: wait for the verifier, open the draft once, open --parallel sessions."""
        from . import store
        from .client import resolve_device
        from .draft_kinds import open_draft, share

        cfg, mine = self.config, self.config.client
        try:
            if self.child is not None:
                self.pool.endpoints = [self.child.wait_ready().endpoint]
            draft, tokenizer = open_draft(mine.draft, cfg.home, mine.dtype, resolve_device(mine.device), mine.engine,
                                          sessions=cfg.parallel * len(self.pool.endpoints))
            draft = share(draft)  # every session's draft forwards that wait together run as one pass
            self.metrics.watch_draft(getattr(draft, "model", draft))
            for endpoint in self.pool.endpoints:
                for _ in range(cfg.parallel):
                    self.clients.append(self._client(endpoint, draft, tokenizer))
            self.pool.learn({e: c.target.verify_curve for c in reversed(self.clients) for e in [endpoint_of(c)]})
            first = self.clients[0]
            self.tokenizer = first.tokenizer or store.load_tokenizer(cfg.model, cfg.home)
            if self.tokenizer is None:
                raise RuntimeError(f"no tokenizer for {cfg.model}: the server needs one for text")
            self.model_id = first.target.model or cfg.model
            self.max_positions = first.context_limit
            self.fingerprint = api.fingerprint(self.model_id, first.target.engine, first.target.dtype)
            warm = self.tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
            for c in self.clients:  # a session's first step allocates the engine's buffers: not in a request
                c.generate(warm, 2)
        except Exception as exc:  # the server stays up and says why on /health
            log.exception("loading failed")
            self.state, self.problem = "failed", f"loading failed: {exc}"
            return
        for c in self.clients:
            loop.call_soon_threadsafe(self.release, c)
        self.state, self.problem = "ready", ""
        if self.child is not None:
            threading.Thread(target=self._supervise, daemon=True, name="dovetail-supervisor").start()

    def _client(self, endpoint: str, draft, tokenizer):
        from .client import Client

        box = []  # the Client, for its own reconnect()
        client = Client.from_config(self.config.client, endpoint=endpoint, draft=draft, tokenizer=tokenizer,
                                    home=self.config.home, reconnect=lambda: self._reconnect(box[0]))
        box.append(client)
        return client

    def check(self) -> None:
        """Raise ``Unavailable`` unless ready (and the verifier child alive)."""
        if self.state == "ready" and self.child is not None and self.child.proc.poll() is not None:
            self.state, self.problem = "restarting", (f"restarting the verifier (it exited with code "
                                                      f"{self.child.proc.returncode}; the supervisor says why)")
        if self.state != "ready":
            raise Unavailable(self.problem)

    async def acquire(self, prompt: list[int] | None = None):
        """A Client for a request with ``prompt`` (with several verifiers: the pool's pick, see VerifierPool),
        or a wait for one, first come first served."""
        self.check()
        if self.idle and not self.waiters:
            client = self.idle.pop(self.pool.pick(self.idle, prompt))
            self.pool.started(client)
            return client
        if len(self.waiters) >= self.config.queue:
            raise Unavailable(f"the server is busy: {len(self.clients)} requests running and {len(self.waiters)} "
                              "waiting; retry later", retry_after=1)
        turn = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        self.metrics.waiting.set(len(self.waiters))
        try:
            return await turn
        except asyncio.CancelledError:  # the request went away; a Client handed over meanwhile goes on
            if turn.done() and not turn.cancelled():
                self.release(turn.result())
            raise
        finally:
            if turn in self.waiters:
                self.waiters.remove(turn)
            self.metrics.waiting.set(len(self.waiters))

    def release(self, client, sequence: list[int] | None = None) -> None:
        """A Client is free: to the oldest waiting request, else to the idle ones (on the event loop);
        ``sequence``: the prompt and output of the request it served (now in its verifier's prefix cache)."""
        self.pool.finished(client, sequence)
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                self.pool.started(client)
                turn.set_result(client)
                return
        self.idle.append(client)

    def close(self) -> None:
        self.closing.set()
        for c in self.clients:
            try:
                c.close()
            except Exception:  # closing on the way out: a dead link must not stop the rest
                log.debug("closing a session failed", exc_info=True)
        if self.child is not None:
            self.child.stop()


class Generation:
    """One request's generation: a worker thread steps the Client's generator and hands each batch of
    accepted tokens to the event loop; ``abandon()`` stops it after the step in flight. The worker
    starts with the first read of ``events()``; the Client goes back to the pool when the worker ends,
    or at ``abandon()`` if it never started (a client gone before its response began)."""

    def __init__(self, backend: Backend, client, ids: list[int], req, loop: asyncio.AbstractEventLoop,
                 constraint: str | None = None):
        """``constraint``: llguidance's grammar for structured output (None: plain text)."""
        from .client import GenerationStats
        from .sampling import SamplingParams

        self.backend, self.client, self.loop = backend, client, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.stats = GenerationStats(n_prompt=len(ids))
        left = backend.max_positions - len(ids)
        if left < 1:
            raise api.ContextOverflow(len(ids), backend.max_positions)
        self.max_new = min(req.limit() or left, left)
        spec = req.speculative
        self.max_draft = spec.n_max if spec and spec.n_max is not None else None
        self.args = (ids, self.max_new, SamplingParams(req.temperature, req.top_k, req.top_p), req.seed, constraint)
        self.logprobs = req.asked_logprobs()  # alternatives per token; None: no logprobs
        self.config = client.drafter_config
        if spec and (spec.n_min is not None or spec.p_min is not None):
            self.config = replace(self.config, p_min=self.config.p_min if spec.p_min is None else spec.p_min,
                                  draft_min=self.config.draft_min if spec.n_min is None else min(spec.n_min, self.config.draft_max))
        self.thread = threading.Thread(target=self._run, daemon=True, name="dovetail-generation")
        self.lock, self.started = threading.Lock(), False
        self.sequence: list[int] = []  # the prompt and what was generated, once the request completes

    def start(self) -> None:
        with self.lock:
            if not self.started:
                self.started = True
                self.thread.start()

    def abandon(self) -> None:
        """Stop: after the step in flight if the worker runs; at once (the Client back) if it never started."""
        with self.lock:
            if self.started:
                self.cancel.set()
                return
            self.started = True  # it never will
        self._release()

    def _release(self) -> None:
        self.backend.metrics.running.dec()
        self.loop.call_soon_threadsafe(self.backend.release, self.client, self.sequence)  # serves the next

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def _run(self) -> None:
        metrics, stats = self.backend.metrics, self.stats
        self.client.configure(self.config)
        try:
            ids, n, params, seed, constraint = self.args
            before = snapshot(stats)
            lps = [] if self.logprobs is not None else None
            generated = []
            stream = self.client.stream(ids, n, params, seed, True, stats, self.max_draft,
                                        logprobs=self.logprobs, logprobs_out=lps, grammar=constraint)
            for tokens in stream:
                before = metrics.step(before, stats)
                generated += tokens
                self._put(("tokens", tokens, None if lps is None else self._shown(tokens, lps[-len(tokens):])))
                if self.cancel.is_set():
                    stream.close()
                    break
            if self._renew():  # before "done": once a response is complete, its state is in the verifier's prefix cache
                self.sequence = ids + generated
            self._put(("done", None, None))
        except Exception as exc:  # a dead verifier, a refused request: the response says so
            from .transport import LinkError

            # one remote verifier unreachable: the server can serve nothing (a child's death shows in check());
            # with several, this request fails, the pool avoids the dead one and the others go on serving
            if isinstance(exc, LinkError) and self.backend.child is None and len(self.backend.pool.endpoints) == 1:
                self.backend.state, self.backend.problem = "failed", f"the verifier is unreachable: {exc}"
            log.warning("generation failed: %s", exc)
            self._put(("error", exc, None))
        finally:
            self.client.configure(self.backend.config.client.draft_config)
            metrics.prompt_tokens.inc(stats.n_prompt)
            metrics.generation_tokens.inc(stats.n_generated)
            if stats.n_generated:
                metrics.ttft.observe(stats.ttft_s)
            if stats.n_generated > 1:
                metrics.per_token.observe((stats.seconds - stats.ttft_s) / (stats.n_generated - 1))
            self._release()

    def _renew(self) -> bool:
        """A fresh session for this slot's next request: the one that served this request ENDs, and its
        state joins the verifier's prefix cache, where any slot's next prompt that starts with it (a chat's
        next turn) takes it; an idle slot holds no cells meanwhile."""
        try:
            self.client.new_session()
            return True
        except Exception as exc:  # the next request opens one (or says why it cannot)
            log.info("could not renew the verifier session after a request: %s", exc)
            return False

    def _shown(self, tokens: list[int], lps: list) -> list[tuple]:
        """Each token's logprobs as the API shows them: (its text, logprob, [(text, logprob) alternatives])."""
        decode = self.backend.tokenizer.decode
        return [(decode([t]), e.logprob, [(decode([i]), v) for i, v in e.top]) for t, e in zip(tokens, lps)]

    async def events(self, stops: list[str]):
        """(text, finish_reason or None, logprobs) as the tokens come: text never splits a UTF-8
        character or shows a stop string; the last event has the finish reason. ``logprobs``: the
        entries of the tokens that arrived with this event ([] when none came, None when none were
        asked); when a stop string ends the text, the entries of the whole batch that held it still
        come (the tokens after it in that batch included)."""
        from .detok import IncrementalDetokenizer

        self.start()
        detok, finder = IncrementalDetokenizer(self.backend.tokenizer), api.StopFinder(stops)
        eos = set(self.client.target.eos)
        last, pending = None, None if self.logprobs is None else []
        while True:
            kind, value, shown = await self.out.get()
            if kind == "error":
                raise value
            if kind == "done":
                break
            last = value[-1]
            if pending is not None:
                pending += shown
            text = finder.push(detok.push(value))
            if finder.stopped:
                self.cancel.set()
                while (await self.out.get())[0] not in ("done", "error"):
                    pass  # the step in flight: the stats are final once the worker is done
                yield text, "stop", pending
                return
            if text:
                yield text, None, pending
                pending = None if pending is None else []
        text = finder.push(detok.flush())
        if finder.stopped:
            yield text, "stop", pending
            return
        yield (text + finder.flush(), "stop" if last in eos or self.stats.n_generated < self.max_new else "length",
               pending)


def encode(backend: Backend, req) -> list[int]:
    tok = backend.tokenizer
    if isinstance(req, api.ChatRequest):
        messages = tools.template_messages([m.template() for m in req.messages])
        return list(tok.apply_chat_template(messages, tools=req.template_tools(), add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    if isinstance(req.prompt, list):
        return list(req.prompt)
    return tok(req.prompt, add_special_tokens=False)["input_ids"]


def fail(status: int, message: str, kind: str = "invalid_request_error", param=None, headers=None) -> JSONResponse:
    """An OpenAI error object (every 4xx / 5xx this server sends is one)."""
    return JSONResponse(api.error(message, kind, status, param), status_code=status, headers=headers)


class Completions:
    """The generation service behind both completion routes: checks a request against the target,
    takes a Client from the pool, and answers whole or as an SSE stream (owns nothing else)."""

    def __init__(self, backend: Backend, metrics: Metrics):
        self.backend, self.metrics = backend, metrics

    async def __call__(self, req, chat: bool):
        backend = self.backend
        backend.check()  # any model name is answered: one target serves them all (as llama.cpp's server does)
        try:
            ids = await asyncio.to_thread(encode, backend, req)
        except (ValueError, TypeError) as exc:
            return fail(400, str(exc), param="messages" if chat else "prompt")
        refused = self._refusal(req, ids)
        if refused:
            return refused
        constraint = await asyncio.to_thread(self._grammar, req)  # a large schema takes a while to compile
        if isinstance(constraint, JSONResponse):
            return constraint
        client = await backend.acquire(ids)
        self.metrics.running.inc()
        try:
            gen = Generation(backend, client, ids, req, asyncio.get_running_loop(), constraint)
        except api.ContextOverflow as exc:
            self.metrics.running.dec()
            backend.release(client)
            return JSONResponse(exc.body("messages" if chat else "prompt"), status_code=400)
        reply = api.Reply(chat, backend.model_id, backend.fingerprint)
        if req.stream:  # abandoned after the response too: it may end before the body starts (client gone)
            return StreamingResponse(self._stream(gen, req, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.abandon))
        return await self._whole(gen, req, reply)

    def _refusal(self, req, ids: list[int]) -> JSONResponse | None:
        vocab = self.backend.clients[0].target.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            return fail(400, f"token ids must be in 0..{vocab - 1}", param="prompt")
        if req.top_k >= vocab:
            return fail(400, f"top_k must be below the vocabulary size {vocab} (0 = off)", param="top_k")
        return None

    @staticmethod
    def _grammar(req) -> str | JSONResponse | None:
        """The request's structured output as llguidance's grammar (None: plain text), or its 400."""
        asked = None
        try:
            asked = req.constraint()
            return grammar.compile_grammar(asked[1], asked[2]) if asked else None
        except ValueError as exc:
            return fail(400, str(exc), param=asked[0] if asked else "response_format")

    async def _whole(self, gen: Generation, req, reply: api.Reply):
        text, finish, logprobs = [], None, None if gen.logprobs is None else []
        try:
            async for piece, finish, shown in gen.events(req.stops()):
                text.append(piece)
                if shown:
                    logprobs += shown
        except Exception as exc:
            if getattr(exc, "code", None) in ("kv_full", "busy"):  # the verifier is full for now: come back
                return fail(503, f"the server is busy: {exc}", "server_error", headers={"Retry-After": "1"})
            if getattr(exc, "code", None) == "bad_grammar":  # compiled here, but not for this target's vocabulary
                return fail(400, str(exc), param=(req.constraint() or ["response_format"])[0])
            return fail(500, f"generation failed: {exc}", "server_error")
        finally:
            gen.abandon()
        text, calls = "".join(text), []
        if req.template_tools():
            text, calls = tools.parse(text)
        self.metrics.success.labels(finished_reason="tool_calls" if calls else finish).inc()
        return reply.whole(text, finish, gen.stats, logprobs, calls)

    async def _stream(self, gen: Generation, req, reply: api.Reply):
        first, finish, offset = reply.chat, None, 0
        held = tools.Holdback() if req.template_tools() else None  # a call's text is held, then sent parsed
        try:
            if first:
                yield reply.chunk(first=True)
            async for piece, finish, shown in gen.events(req.stops()):
                piece = held.push(piece) if held else piece
                if piece or shown:
                    yield reply.chunk(piece, logprobs=shown, offset=offset)
                    offset += len(piece)
            if held:
                rest, calls = held.finish()
                if rest:
                    yield reply.chunk(rest, offset=offset)
                if calls:
                    yield reply.chunk(tool_calls=calls)
                    finish = "tool_calls"
            yield reply.chunk(finish=finish, stats=gen.stats)
            if req.stream_options and req.stream_options.include_usage:
                yield reply.usage_chunk(gen.stats)
            self.metrics.success.labels(finished_reason=finish).inc()
        except Exception as exc:  # the verifier died mid-stream: an error event ends the stream
            yield api.sse(api.error(f"generation failed: {exc}", "server_error", 500))
        finally:
            gen.abandon()  # a client that went away: stop after the step in flight
        yield api.DONE


def create_app(config: ServeConfig) -> FastAPI:
    """The app: a Backend (verifier child + Client pool) started with it, errors in OpenAI's shape,
    the API key and CORS, and the routes."""
    from contextlib import asynccontextmanager

    metrics = Metrics()
    backend = Backend(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        backend.start()
        loader = threading.Thread(target=backend.load, args=(loop,), daemon=True, name="dovetail-load")
        loader.start()  # /health answers 503 until it is done
        yield
        await asyncio.to_thread(backend.close)

    app = FastAPI(title="dovetail_rt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend = backend
    add_error_handlers(app)
    add_access(app, config)
    add_routes(app, backend, metrics, Completions(backend, metrics))
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error the framework or a route raises leaves as an OpenAI error object."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, field = api.validation_message(exc.errors())
        return fail(400, message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # the framework's own 404 / 405: OpenAI's shape
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}: the API is at /v1 (chat/completions, "
                        "completions, models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return fail(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("the request failed")
        return fail(500, f"internal error: {exc}", "server_error")

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return fail(exc.status, str(exc), "unavailable_error", headers=headers)


def add_access(app: FastAPI, config: ServeConfig) -> None:
    """The API key (every route but PUBLIC) and, with --cors-origin, CORS."""

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if config.api_key and request.url.path not in PUBLIC:
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                return fail(401, "invalid or missing API key: send Authorization: Bearer KEY", "authentication_error")
        return await call_next(request)

    if config.cors_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=config.cors_origins != ("*",))


def add_routes(app: FastAPI, backend: Backend, metrics: Metrics, complete: Completions) -> None:
    """The routes; the API's ones also without /v1 (llama.cpp serves both: a client whose base URL is
    the host root posts there)."""

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        """A chat page: streams a conversation, shows tokens/s, tau and acceptance under each reply."""
        return HTMLResponse((Path(__file__).parent / "static" / "chat.html").read_text())

    @app.get("/health")
    async def health():
        try:
            backend.check()
        except Unavailable as exc:
            return fail(503, str(exc), "unavailable_error")
        body = {"status": "ok", "verifier": {"restarts": backend.restarts, "last_death": backend.last_death or None}}
        if len(backend.pool.endpoints) > 1:  # several: each one's state, sessions and running requests
            body["verifiers"] = backend.pool.report(backend.clients)
        return body

    @app.get("/metrics")
    async def metrics_text():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if len(backend.pool.endpoints) > 1:  # several verifiers: each one's state, as /health lists them
            metrics.watch_verifiers(backend.pool.report(backend.clients))
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        backend.check()
        names = dict.fromkeys((backend.model_id, *backend.config.aliases))
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dovetail_rt"}
                                           for name in names]}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(req: api.ChatRequest):
        return await complete(req, chat=True)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(req: api.CompletionRequest):
        return await complete(req, chat=False)


def run(config: ServeConfig) -> int:
    import uvicorn

    app = create_app(config)
    each = f" on each of {len(config.verifiers)} verifiers" if len(config.verifiers) > 1 else ""
    print(f"dovetail serve: http://{config.host}:{config.port}  (OpenAI API at /v1; /health is 503 until the models "
          f"load; {config.parallel} parallel{each}, {config.queue} queued{', API key required' if config.api_key else ''})",
          flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"dovetail serve: WARNING: {config.host} reaches other hosts and no --api-key is set: anyone there can "
              "use this server", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0

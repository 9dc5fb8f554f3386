"""The CPU target side's serving: the socket loop, sessions and their admission (limits, idle
reclaim), the protocol's handlers and replies. The pass itself (forward, accept, commit) is
``verify_pass``.

One process serves many draft sessions over a ROUTER socket. Requests that wait together are
answered together: the VERIFYs of different sessions run as one forward pass (``run_pass``: a CPU
pass over several sessions' tokens costs far less than the passes apart), then each session accepts
alone. A prompt goes in a chunk per pass, in the same forward as
the others' steps: a long prefill never stalls them for long. Each session owns a model state (``lm.Session``,
on whichever engine the target was opened) that holds the committed tokens except the last one,
the *root*, which the next VERIFY runs first. A state outlives its session in the ``PrefixCache``,
for the next prompt that starts with what it holds (a chat's next turn).
"""

from __future__ import annotations

import logging
import os
import secrets
import time

import zmq

from . import lm, protocol, sampling, transport, verify_pass
from .config import VerifierConfig
from .protocol import Message, MsgType, ProtocolError
from .grammar import GrammarError, Grammars
from .prefix_cache import PrefixCache, common_prefix
from .transport import CappedWarnings, peer_host
from .verify_pass import Prefill, Session, Work

log = logging.getLogger(__name__)


class Verifier:
    """Protocol handlers around one target model; ``serve`` runs them on a socket."""

    def __init__(self, target: lm.LM, config: VerifierConfig, verify_curve: dict | None = None,
                 grammars: Grammars | None = None):
        """``grammars``: the target's tokenizer for structured output (default: its token strings)."""
        self.target, self.config = target, config
        self.verify_curve = verify_curve  # {q: seconds} measured on this machine, sent to drafts
        info = target.info
        self.vocab_size, self.max_positions, self.vocab, self.eos = info.vocab_size, info.max_positions, info.vocab, info.eos
        self.sessions: dict[int, Session] = {}
        self.grammars = grammars or Grammars(info.vocab, info.vocab_size, info.eos)
        self.hosts: dict[bytes, str] = {}  # CURVE: connection -> its authorized host (key name), this drain's
        self.orphans: list[tuple[bytes, Message]] = []  # replies to STARTs whose prompt will never go in
        self.cache = PrefixCache(config.n_ctx if config.prefix_cache is None else config.prefix_cache)
        self._warn = CappedWarnings(log)  # refusal warnings: 20 per 10 s, the rest counted

    # ---- dispatch -------------------------------------------------------------------------
    def handle(self, identity: bytes, msg: Message) -> Message | None:
        """The reply to one request; None for a START (answered by the pass that finishes its prompt)."""
        handlers = {
            MsgType.HELLO: self.on_hello, MsgType.START: self.on_start,
            MsgType.VERIFY: self.on_verify, MsgType.END: self.on_end,
        }
        if msg.type not in handlers:
            raise ProtocolError(f"the verifier does not accept {msg.type.name} messages", "bad_type")
        try:
            reply = handlers[msg.type](identity, msg)
        except ProtocolError as exc:
            exc.seq = msg.seq
            raise
        if reply is not None:
            reply.seq = msg.seq
        return reply

    def session(self, identity: bytes, msg: Message) -> Session:
        sid = protocol.get_int(msg, "session")
        s = self.sessions.get(sid)
        if s is None or s.identity != identity:
            raise ProtocolError(f"unknown session {sid}: open one with HELLO first", "unknown_session")
        s.last_used = time.monotonic()
        return s

    # ---- handlers ---------------------------------------------------------------------------
    def on_hello(self, identity: bytes, msg: Message) -> Message:
        draft_vocab = msg.fields.get("vocab") or []
        if not isinstance(draft_vocab, list):
            raise ProtocolError("'vocab' must be a list of token strings")
        mismatch = tokenizer_mismatch(draft_vocab, self.vocab)
        if mismatch:
            raise ProtocolError(mismatch, "tokenizer_mismatch")
        self.reclaim_idle()
        host = self.hosts.get(identity)
        self._check_room(identity, host)
        sid = secrets.randbits(62)
        self.sessions[sid] = Session(sid, identity, host)
        log.info("session %d opened%s (%d open)", sid, f" for host {host}" if host else "", len(self.sessions))
        info = self.target.info
        return protocol.Welcome(
            session=sid, model=info.name, engine=info.engine, dtype=info.weight_format, vocab_size=self.vocab_size,
            hidden_size=info.hidden_size, eos=tuple(self.eos), max_positions=self.max_positions,
            max_draft_tokens=self.config.max_draft_tokens, trees=info.trees, features=info.features,
            verify_curve=dict(self.verify_curve or {})).message()

    def on_start(self, identity: bytes, msg: Message) -> None:
        """New generation: checks, then the prompt is prefilled a chunk per pass (``run_pass``), whose
        last chunk samples the first token and answers."""
        s = self.session(identity, msg)
        prompt = protocol.get_int_list(msg, "prompt", 0, self.vocab_size - 1, self.max_positions - 1)
        if not prompt:
            raise ProtocolError("the prompt is empty: send at least one token", "out_of_range")
        constraint = self._constraint(msg, prompt)  # a refused grammar leaves the session as it was
        s.params = sampling.SamplingParams(
            temperature=protocol.get_float(msg, "temperature", 0.0, 100.0, 0.0),
            top_k=protocol.get_int(msg, "top_k", 0, self.vocab_size, 0),
            top_p=protocol.get_float(msg, "top_p", 1e-6, 1.0, 1.0),
        )
        seed = secrets.randbits(63) if msg.fields.get("seed") is None else protocol.get_int(msg, "seed", -(2**63), 2**64 - 1)
        s.seed = seed % (1 << 64)
        s.logprobs = (None if msg.fields.get("logprobs") is None
                      else protocol.get_int(msg, "logprobs", 0, sampling.MAX_TOP_LOGPROBS))
        want_features = bool(msg.fields.get("features", False))
        if want_features and not self.target.info.features:
            raise ProtocolError(f"the {self.target.info.engine} engine gives no features: use a draft LM", "no_features")
        self._abandon(s, "superseded", "a newer START on this session replaced this one before its prompt went in")
        cached = self._reuse(s, prompt, want_features)
        s.constraint, s.grammar_s = constraint, 0.0
        s.root, s.prefill = None, Prefill(identity, msg.seq, list(prompt[cached:]), cached=cached)

    def _reuse(self, s: Session, prompt: list[int], want_features: bool) -> int:
        """Give ``s`` the target state that shares the longest prefix with ``prompt`` (its own, or one
        a finished session left in the prefix cache, its own going there instead), truncated to that
        prefix; -> how many prompt tokens it already holds. The prompt's last token always runs (its
        logits choose the first token); a session that wants features (a head's) prefills its whole
        prompt, since the head reads the features of all of it."""
        reuse = self.cache.max_tokens and not want_features  # --prefix-cache 0: every prompt prefills whole
        limit = len(prompt) - 1 if reuse else 0
        own = common_prefix(s.tokens, prompt, limit) if s.state is not None and s.want_features == want_features else 0
        hit = self.cache.take(prompt, limit, better_than=own)
        if hit is not None:
            entry, own = hit
            self._release(s)
            s.state, s.tokens, s.want_features = entry.state, entry.tokens, want_features
        elif s.state is None or s.want_features != want_features:
            self._release(s)
            s.state, s.tokens, s.want_features = self._new_state(want_features), [], want_features
        s.state.truncate(own)
        del s.tokens[own:]
        return own

    def _new_state(self, want_features: bool) -> lm.Session:
        """A fresh target state; where the engine has no room (llama.cpp's sequence ids), cached states go first."""
        while True:
            try:
                return self.target.session(features=want_features)
            except lm.CacheFull:
                if not self.cache.evict():
                    raise

    def _constraint(self, msg: Message, prompt: list[int]):
        """START's ``grammar`` (llguidance's, from ``grammar.compile_grammar``) as this generation's
        state; ``generated``: how many of the prompt's last tokens were generated under it already (a
        client resuming on a new session), consumed first."""
        text = msg.fields.get("grammar")
        if text is None:
            return None
        if not isinstance(text, str) or not text:
            raise ProtocolError("'grammar' must be a non-empty string (llguidance's grammar)", "bad_grammar")
        done = protocol.get_int(msg, "generated", 0, len(prompt), 0)
        try:
            constraint = self.grammars.constraint(text)
            for token in prompt[len(prompt) - done:]:
                constraint.consume(token)
            constraint.allowed()  # a vocabulary that cannot spell anything it allows: refused now, not mid-way
        except GrammarError as exc:
            raise ProtocolError(str(exc), "bad_grammar") from None
        return constraint

    def on_verify(self, identity: bytes, msg: Message) -> Message:
        ((_, reply),) = self.run_pass([(identity, msg)], prefill=False)
        return reply

    def run_pass(self, verifies: list[tuple[bytes, Message]], prefill: bool = True) -> list[tuple[bytes, Message]]:
        """One step of the verifier: the VERIFYs waiting (at most one per session; ``step`` sees to it)
        and up to ``prefill_chunk`` prompt tokens of the sessions starting, in ONE forward where the
        engine batches (``verify_pass``). Replies: every VERIFY's, and the START of each prompt that
        went in whole."""
        replies, work = [], []
        for identity, msg in verifies:
            try:
                work.append(Work(identity, msg.seq, *self._verify_request(identity, msg)))
            except ProtocolError as exc:
                exc.seq = msg.seq
                replies.append((identity, self._error_reply(identity, exc)))
        budget = self.config.prefill_chunk if prefill else 0
        for s in sorted((s for s in self.sessions.values() if s.prefill), key=lambda s: s.prefill.started):
            chunk = s.prefill.left[:budget]
            if chunk:
                work.append(Work(s.prefill.identity, s.prefill.seq, s, chunk, None, int(len(chunk) == len(s.prefill.left))))
                budget -= len(chunk)
        for w, answer in verify_pass.run_pass(self.target, work, make_room=self.cache.evict):
            reply = self._error_reply(w.identity, answer) if isinstance(answer, ProtocolError) else answer
            reply.seq = w.seq
            replies.append((w.identity, reply))
        return replies

    def _verify_request(self, identity: bytes, msg: Message) -> tuple[Session, list[int], list[int]]:
        """A VERIFY's session and its root + draft tree as one forward's tokens and parents, checked."""
        s = self.session(identity, msg)
        if s.root is None:
            raise ProtocolError("VERIFY before START: send the prompt first", "no_prompt")
        limit = min(self.config.max_draft_tokens, self.max_positions - s.state.length - 2)
        draft = protocol.get_int_list(msg, "tokens", 0, self.vocab_size - 1, max(limit, 0))
        parents = protocol.get_int_list(msg, "parents", 0, len(draft), len(draft))
        why = sampling.validate_tree(parents, len(draft))
        if why:
            raise ProtocolError(f"draft is not a tree: {why}", "bad_tree")
        tokens, parents = [s.root] + draft, [-1] + parents
        if s.constraint is not None:  # cut at the first token the grammar forbids: it could never be accepted
            t0 = time.perf_counter()
            keep = s.constraint.cut(tokens, parents)
            s.grammar_s += time.perf_counter() - t0
            if len(keep) < len(tokens):
                index = {old: new for new, old in enumerate(keep)}
                tokens, parents = [tokens[k] for k in keep], [-1] + [index[parents[k]] for k in keep[1:]]
        return s, tokens, parents

    def on_end(self, identity: bytes, msg: Message) -> Message:
        s = self.session(identity, msg)
        self._close(s)
        log.info("session %d closed (%d open)", s.id, len(self.sessions))
        return Message(MsgType.BYE, fields={"session": s.id})

    # ---- limits -----------------------------------------------------------------------------
    def _check_room(self, identity: bytes, host: str | None) -> None:
        """A new session must not cost anyone else theirs: past a limit HELLO is refused with ``busy``
        (and when to retry), never by closing another peer's session. A peer is an authorized host (its
        key) on a CURVE link, where one host may open many connections; else one connection."""
        cfg, now = self.config, time.monotonic()
        if host is not None:
            mine, who = sum(s.host == host for s in self.sessions.values()), f"host {host} (its key)"
        else:
            mine, who = sum(s.identity == identity for s in self.sessions.values()), "this connection"
        if mine >= cfg.max_sessions_per_peer:
            raise ProtocolError(f"{who} already holds {mine} sessions, the most one peer may (--max-sessions-per-peer "
                                f"{cfg.max_sessions_per_peer}): END one before opening another", "busy", retry_after=1)
        if len(self.sessions) >= cfg.max_sessions:
            soonest = min(s.last_used for s in self.sessions.values()) + cfg.idle_timeout_s - now
            retry = max(1, int(soonest + 1))
            raise ProtocolError(f"the verifier serves {cfg.max_sessions} sessions, its limit: retry in {retry} s (an idle "
                                f"session is reclaimed after {cfg.idle_timeout_s:.0f} s), or start it with a larger "
                                "--max-sessions", "busy", retry_after=retry)

    def reclaim_idle(self) -> None:
        """Close the sessions nobody used for ``idle_timeout_s`` (a draft process that died or left
        without END): their KV memory goes back to the pool."""
        cutoff = time.monotonic() - self.config.idle_timeout_s
        self.cache.drop_idle(cutoff)
        for s in [s for s in self.sessions.values() if s.last_used < cutoff]:
            self._close(s)
            log.info("session %d reclaimed after %.0f s idle (%d open)", s.id, self.config.idle_timeout_s, len(self.sessions))

    # ---- helpers ----------------------------------------------------------------------------
    def _close(self, s: Session) -> None:
        self._abandon(s, "unknown_session", f"session {s.id} was closed before this START's prompt went in")
        self._release(s)
        del self.sessions[s.id]

    def _abandon(self, s: Session, code: str, text: str) -> None:
        """A START whose prompt will never go in still gets its one reply (with the next ``step``'s)."""
        if s.prefill is not None:
            self.orphans.append((s.prefill.identity, protocol.error(s.prefill.seq, code, text)))
            s.prefill = None

    def _release(self, s: Session) -> None:
        """``s`` gives up its target state: to the prefix cache, for a later prompt that starts with it."""
        if s.state is not None:
            if s.want_features:  # its features are not kept: no later prompt could take it
                s.state.close()
            else:
                self.cache.put(s.tokens, s.state)
            s.state, s.tokens = None, []

    # ---- the socket loop ----------------------------------------------------------------------
    def serve(self, sock: zmq.Socket, should_stop=lambda: False, poll_ms: int = 200) -> None:
        """Answer requests until ``should_stop()``; a bad request never stops the loop. Each turn takes
        every request waiting and runs one pass (``step``); while prompts are going in it does not wait."""
        reclaimed, curve = time.monotonic(), bool(sock.getsockopt(zmq.CURVE_SERVER))
        while not should_stop():
            if time.monotonic() - reclaimed > 1.0:  # also under steady traffic: dead clients' KV goes back
                self.reclaim_idle()
                reclaimed = time.monotonic()
            waiting = []
            if sock.poll(0 if self.prefilling else poll_ms):
                while len(waiting) < 4 * self.config.max_sessions and sock.poll(0):
                    identity, *body = sock.recv_multipart(copy=False)
                    if curve and body:
                        self.hosts[identity.bytes] = peer_host(body[0])
                    waiting.append((identity.bytes, body))
            elif not self.prefilling and not self.orphans:
                continue
            for identity, reply in self.step(waiting):
                try:  # never wait on one peer: a peer that stops reading loses its own replies, nobody else's
                    sock.send_multipart([identity, *protocol.encode(reply)], copy=False, flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    self._warn("could not reply to peer %s (gone, or not reading its replies): %s", identity.hex(), exc)
            self.hosts.clear()

    @property
    def prefilling(self) -> bool:
        return any(s.prefill for s in self.sessions.values())

    def step(self, waiting: list[tuple[bytes, list]]) -> list[tuple[bytes, Message]]:
        """Requests that arrived together, then one pass. Each peer's first VERIFY joins the pass
        (distinct sessions, one forward) with the next chunk of every prompt going in; everything else
        is answered first, one by one, except what a peer sent after its VERIFY (answered after the
        pass, in order). A START is answered by the pass that finishes its prompt."""
        replies, batch, after, held = [], [], [], set()
        for identity, body in waiting:
            try:
                msg = protocol.decode(body, self.config.link.max_message_bytes)
            except ProtocolError as exc:
                replies.append((identity, self._error_reply(identity, exc)))
                continue
            if identity in held:  # behind this peer's VERIFY
                after.append((identity, msg))
            elif msg.type == MsgType.VERIFY:
                held.add(identity)
                batch.append((identity, msg))
            else:
                replies.append((identity, self.answer(identity, msg)))
        if batch or self.prefilling:
            try:
                replies += self.run_pass(batch)
            except Exception as exc:  # a failed pass must not take the verifier down
                log.exception("internal error in a pass")
                replies += [(identity, protocol.internal_error(msg.seq, exc)) for identity, msg in batch]
        replies += [(identity, self.answer(identity, msg)) for identity, msg in after]
        replies, self.orphans = self.orphans + replies, []  # an abandoned START's reply before the later ones
        return [(identity, reply) for identity, reply in replies if reply is not None]

    def reply_all(self, waiting: list[tuple[bytes, list]]) -> list[tuple[bytes, Message]]:
        """``step``, then passes until every prompt started is in: all the replies these requests get."""
        replies = self.step(waiting)
        while self.prefilling:
            replies += self.step([])
        return replies

    def answer(self, identity: bytes, msg: Message) -> Message | None:
        """The reply to one decoded request (None: a START, answered by a pass); an error reply when
        it is refused or fails."""
        try:
            return self.handle(identity, msg)
        except ProtocolError as exc:
            return self._error_reply(identity, exc)
        except Exception as exc:  # a failed forward must not take the other sessions down
            log.exception("internal error while serving peer %s", identity.hex())
            return protocol.internal_error(msg.seq, exc)

    def _error_reply(self, identity: bytes, exc: ProtocolError) -> Message:
        self._log_refusal(identity, exc)
        return protocol.error(exc.seq, exc.code, str(exc), **exc.fields)

    def _log_refusal(self, identity: bytes, exc: ProtocolError) -> None:
        self._warn("refused a message from peer %s: [%s] %s", identity.hex(), exc.code, exc)


def tokenizer_mismatch(draft: list[str], target: list[str]) -> str | None:
    """None when the vocabularies agree (or one side has none), else the first difference."""
    if not draft or not target:
        return None
    for i, (d, t) in enumerate(zip(draft, target)):
        if d != t:
            return f"draft and target tokenizers differ at id {i}: {d!r} (draft) vs {t!r} (target)"
    longer = draft if len(draft) > len(target) else target
    if len(draft) != len(target) and not all(_is_padding(t) for t in longer[min(len(draft), len(target)):]):
        i = min(len(draft), len(target))
        extra = draft[i] if len(draft) > i else target[i]
        side = "draft" if len(draft) > i else "target"
        return (f"draft and target tokenizers differ at id {i}: only the {side} has it ({extra!r}); "
                f"sizes {len(draft)} (draft) vs {len(target)} (target)")
    return None


def _is_padding(token: str) -> bool:
    """Rows past a tokenizer's end that a model file pads its vocabulary with ("[PAD151665]", or none)."""
    return token == "" or (token.startswith("[PAD") and token.endswith("]") and token[4:-1].isdigit())


def curve_key(info: lm.ModelInfo) -> str:
    """Which saved curve fits an opened target: its engine and weight format ("bfloat16", "llamacpp-Q4_0")."""
    return info.weight_format if info.engine == "torch" else f"{info.engine}-{info.weight_format}"


def load_verify_curve(home, model: str, dtype: str, threads: int | None = None) -> tuple[dict | None, str]:
    """This machine's measured chain curve for the model and engine/format key (``curve_key``) at
    ``threads`` threads (None: any), if `dovetail models install` or `dovetail bench --verify-curve`
    measured it here, and a start-up line that says which curve it is (or why there is none)."""
    import json

    from .placement import machine_id

    path = home / "verify_curve.json"
    if not path.exists():
        return None, "none measured (drafts learn T_V online; `dovetail bench --verify-curve` measures it)"
    try:
        saved = json.loads(path.read_text())
        if saved.get("machine_id") != machine_id():
            where = (f"was measured on another CPU ({saved['cpu']})" if "machine_id" in saved else
                     "names no machine (kept before curves were kept per machine)")
            return None, (f"none for this machine ({path} {where}): drafts learn T_V online; "
                          "`dovetail bench --verify-curve` measures it here")
        measured_threads = saved.get("threads", {}).get(dtype)
        if threads and measured_threads and measured_threads != threads:
            return None, (f"none for {threads} threads ({path} holds {dtype} at {measured_threads}): drafts learn T_V "
                          "online; `dovetail bench --verify-curve` with these settings measures it")
        if saved.get("model") == model.split(":", 1)[0] and dtype in saved.get("curves", {}):
            curve = {int(q): float(t) for q, t in saved["curves"][dtype]["chain"].items()}
            when = saved.get("measured", {}).get(dtype, "")
            line = (f"measured here{' ' + when if when else ''} for {dtype}"
                    f"{f' at {measured_threads} threads' if measured_threads else ''}: T_V(q) at q="
                    f"{','.join(map(str, sorted(curve)))}")
            if curve.get(1):
                line += f", T_V(1) {1000 * curve[1]:.1f} ms"
                if 8 in curve:
                    line += f", T_V(8)/T_V(1) {curve[8] / curve[1]:.2f}"
            return curve, line
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        log.warning("ignoring unreadable verification curve %s", path)
    return None, f"none for {model} ({dtype}) in {path}: drafts learn T_V online"


def memory_report() -> str:
    import psutil

    return f"process RSS {psutil.Process(os.getpid()).memory_info().rss / 2**30:.2f} GiB"


def open_socket(config: VerifierConfig) -> tuple[zmq.Socket, str, object | None]:
    return transport.bind_router(zmq.Context.instance(), config.link)


def kv_report(target: lm.LM) -> str:
    """The shared KV pool's size, for engines that allocate one up front (llama.cpp)."""
    cells = getattr(target, "kv_cells", None)
    if not cells:
        return ""
    return f"; KV pool {cells} tokens shared by all sessions ({cells * target.kv_bytes_per_token() / 2**30:.2f} GiB)"

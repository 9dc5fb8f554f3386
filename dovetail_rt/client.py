"""The draft side: a Client that drafts locally and has a remote verifier check the drafts.

    with Client(verifier="tcp://127.0.0.1:5557", draft="qwen2.5-coder-0.5b") as client:
        out = client.generate(input_ids, max_new_tokens=64)
        out.token_ids, out.stats
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import protocol, store, transport
from .config import ClientConfig, DraftConfig, LinkConfig, dovetail_home
from .cost import sized
from .draft_kinds import make_drafter, open_draft
from .drafter import Feedback
from .protocol import Message, MsgType
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class VerifierError(RuntimeError):
    """The verifier refused a request; ``code`` says why (see the protocol spec)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"verifier refused the request [{code}]: {message}")
        self.code, self.retry_after = code, retry_after  # retry_after: seconds, with ``busy``


@dataclass
class Timings:
    draft_s: float = 0.0
    verify_s: float = 0.0
    link_s: float = 0.0
    prefill_s: float = 0.0
    grammar_s: float = 0.0  # structured output: the verifier's time on the grammar (masks, cutting drafts)


@dataclass
class KindStats:
    """One draft kind's share of a generation (``ngram+DRAFT`` mixes two)."""

    steps: int = 0  # steps this kind drafted for
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0

    @property
    def draft_us_per_step(self) -> float:
        return 1e6 * self.draft_s / self.steps if self.steps else 0.0


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens the verifier's prefix cache held already (not prefilled)
    n_generated: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    n_steps: int = 0  # VERIFY round trips (target forwards after the prefill)
    tau: float = 0.0  # mean accepted length: tokens per target forward, bonus token included
    seconds: float = 0.0
    tok_per_s: float = 0.0
    ttft_s: float = 0.0  # time to the first generated token
    timings: Timings = field(default_factory=Timings)
    by_kind: dict[str, KindStats] = field(default_factory=dict)  # draft kind -> its steps (``none``: nothing drafted)
    shared_steps: int = 0  # steps verified in one pass with other sessions' steps
    resumed: int = 0  # times the session was lost (verifier restart, reclaimed) and resumed on a new one
    last_batch: int = 1  # sessions in the pass that verified the last step

    def record_step(self, n_drafted: int, n_accepted: int, draft_s: float, verify_s: float, round_trip_s: float,
                    kind: str = "", batch: int = 1) -> None:
        """One VERIFY step: counts, tau (bonus included), the draft / verify / link split, the share
        of the draft kind that made the step's draft, and how many sessions its pass verified."""
        self.last_batch = batch
        self.shared_steps += batch > 1
        kind = (kind or "draft") if n_drafted else "none"
        share = self.by_kind.setdefault(kind, KindStats())
        share.steps, share.drafted, share.accepted, share.draft_s = (
            share.steps + 1, share.drafted + n_drafted, share.accepted + n_accepted, share.draft_s + draft_s)
        self.n_steps += 1
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        self.tau = (self.n_accepted + self.n_steps) / self.n_steps
        self.timings.draft_s += draft_s
        self.timings.verify_s += verify_s
        self.timings.link_s += max(0.0, round_trip_s - verify_s)

    def record_time(self, seconds: float) -> None:
        """Wall time so far (prompt in -> last token out) and the rate it gives."""
        self.seconds = seconds
        self.tok_per_s = self.n_generated / seconds if seconds > 0 else 0.0

    @property
    def accept_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0


@dataclass
class Generation:
    token_ids: list[int]  # generated ids only
    stats: GenerationStats
    logprobs: list["TokenLogprob"] = field(default_factory=list)  # one per generated id, when asked for


@dataclass(frozen=True)
class TokenLogprob:
    """The target's own log-probability of a generated token (raw: before temperature, top-k and
    top-p) and its most likely alternatives, (id, logprob), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _logprobs(reply: Message) -> list[TokenLogprob]:
    """A RESULT's log-probabilities, one per new token (accepted, then the bonus)."""
    t = reply.tensors
    if "logprobs" not in t:
        raise VerifierError("bad_reply", "the verifier sent no logprobs although they were asked for")
    chosen = t["logprobs"].tolist()
    ids, lps = (t["top_ids"].tolist(), t["top_logprobs"].tolist()) if "top_ids" in t else ([[]] * len(chosen),) * 2
    return [TokenLogprob(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids, lps)]


class Client:
    """Draft side of dovetail_rt. Use as a context manager; one session on the verifier."""

    def __init__(
        self,
        verifier: str = "tcp://127.0.0.1:5557",
        draft="qwen2.5-coder-0.5b",
        device: str = "cpu",
        tokenizer=None,
        draft_config: DraftConfig = DraftConfig(),
        timeout_s: float = LinkConfig.timeout_s,
        dtype: str = "auto",
        home: Path | None = None,
        engine: str = "auto",
        curve_secret_key: str | None = None,
        curve_server_key: str | None = None,
        reconnect=None,
    ):
        """``curve_secret_key`` / ``curve_server_key``: this host's secret key file and the verifier's public
        key file (`dovetail keys generate`), for a verifier that listens with keys (CURVE).
        A session lost mid-generation (the verifier restarted, or closed it idle) is reopened and resumed
        within ``timeout_s``; ``reconnect()`` (optional) gives the endpoint to reopen it at after a dead
        link (a restarted child's)."""
        self.link = LinkConfig(endpoint=verifier, timeout_s=timeout_s, curve_secret_key=curve_secret_key,
                               curve_server_key=curve_server_key)
        if self.link.curve and not self.link.curve_server_key:
            raise ValueError("--curve-secret-key needs --curve-server-key: the verifier's public key file")
        self.device = resolve_device(device)
        model, loaded_tok = open_draft(draft, home or dovetail_home(), dtype, self.device, engine)
        self.tokenizer = tokenizer or loaded_tok
        self.conn, self._reconnect = self._connect(self.link.endpoint), reconnect
        self.session, self.drafter, self._generation = None, None, 0
        try:
            self.target = self._hello()
            self.drafter_config = sized(draft_config, self.target.verify_curve)  # its caps set for the curve
            self.drafter = make_drafter(model, self.drafter_config, self.target.verify_curve)
            if self.tokenizer is None and self.drafter.kind == "ngram":  # a lookup has no tokenizer: the target's, if here
                self.tokenizer = _local_tokenizer(self.target.model, home or dovetail_home())
            missing = self._missing_capability(draft_config)
            if missing:
                raise VerifierError("unsupported", missing)
        except BaseException:
            self.close()  # the session (if opened) and the socket
            raise

    @classmethod
    def from_config(cls, config: ClientConfig, *, endpoint: str | None = None, draft=None, tokenizer=None,
                    home: Path | None = None, reconnect=None) -> "Client":
        """A Client as ``config`` says; ``endpoint`` instead of its link's (a child verifier's), ``draft``
        an already opened draft instead of opening ``config.draft`` (a server's shared one)."""
        link = config.link
        return cls(verifier=endpoint or link.endpoint, draft=config.draft if draft is None else draft,
                   device=config.device, tokenizer=tokenizer, draft_config=config.draft_config,
                   timeout_s=link.timeout_s, dtype=config.dtype, home=home, engine=config.engine,
                   curve_secret_key=link.curve_secret_key, curve_server_key=link.curve_server_key,
                   reconnect=reconnect)

    # ---- session ------------------------------------------------------------------------------
    def _connect(self, endpoint: str) -> transport.Connection:
        return transport.Connection(endpoint, self.link.timeout_s, self.link.max_message_bytes,
                                    curve=(self.link.curve_secret_key, self.link.curve_server_key) if self.link.curve else None)

    def _request(self, msg: Message) -> Message:
        if self.conn is None:  # dropped when it could not be reopened: the next request resumes first
            raise transport.LinkLost("the link to the verifier was lost and is not open yet")
        reply = self.conn.request(msg)
        if reply.type == MsgType.ERROR:
            retry = reply.fields.get("retry_after")
            raise VerifierError(str(reply.fields.get("code")), str(reply.fields.get("message")),
                                float(retry) if isinstance(retry, (int, float)) else None)
        return reply

    def _resume(self, committed: list[int], start: dict, why: Exception) -> Message:
        """The session is gone (``why``): open a new one, at ``reconnect()``'s endpoint if given, and
        prefill the committed context there; the reply's bonus is the next token. Within the timeout,
        else a clear error. Greedy output is unchanged; sampling keeps the target's distribution."""
        log.warning("verifier session lost (%s): resuming on a new session from %d tokens", why, len(committed))
        # `unknown_session`: the verifier answered, so it is where it was and holds nothing of ours. A dead
        # link: the verifier may be only slow (END the old session, else it holds it until idle), or gone
        # (``reconnect()`` says where it is now, e.g. a restarted child)
        link_lost = isinstance(why, transport.LinkLost)
        if link_lost and self.session is not None and self.conn is not None:
            try:
                self.conn.request(Message(MsgType.END, fields={"session": self.session}), timeout_s=1.0)
            except transport.LinkError:
                pass
        old = self.conn
        try:
            endpoint = self._reconnect() if link_lost and self._reconnect else (old.endpoint if old else self.link.endpoint)
        except transport.LinkError as exc:  # nowhere to go now (a dead child restarting): this request fails,
            if old is not None:             # the next one reopens at reconnect()'s endpoint first
                old.close()
            self.conn, self.session = None, None
            raise transport.LinkError(f"the verifier session was lost ({why}) and could not be resumed: {exc}") from exc
        if old is not None:
            old.close()
        self.conn, self.session = self._connect(endpoint), None  # a new connection: the old one's sessions are gone
        try:
            self._hello()
            reply = self._request(Message(MsgType.START, fields=dict(start, session=self.session, prompt=committed)))
        except (transport.LinkError, VerifierError) as exc:
            raise transport.LinkError(f"the verifier session was lost ({why}) and could not be resumed at {endpoint}: "
                                      f"{exc}") from exc
        self.drafter.reset()
        self.drafter.observe(Feedback(reply.tensors.get("features")))
        return reply

    @staticmethod
    def _lost(exc: Exception) -> bool:
        return isinstance(exc, transport.LinkLost) or (isinstance(exc, VerifierError) and exc.code == "unknown_session")

    def _missing_capability(self, config: DraftConfig) -> str | None:
        """Why this draft cannot work with the verifier's engine (WELCOME says what it can do)."""
        engine = self.target.engine
        if self.drafter.wants_features and not self.target.features:
            return (f"this draft head needs the target's features, and the verifier's {engine} engine gives none: "
                    "start the verifier with --engine torch, or draft with a small LM (-md)")
        if config.is_tree and not self.target.trees:
            return f"the verifier's {engine} engine verifies chains only: drop --tree-top-k or use --engine torch"
        return None

    def _hello(self) -> protocol.Welcome:
        vocab = store.vocab_strings(self.tokenizer)
        reply = self._request(Message(MsgType.HELLO, fields={"vocab": vocab}))
        if reply.type != MsgType.WELCOME:
            raise transport.LinkError(f"expected WELCOME from the verifier, got {reply.type.name}")
        try:
            welcome = protocol.Welcome.decode(reply)
        except protocol.ProtocolError as exc:
            raise transport.LinkError(f"unusable WELCOME from {self.conn.endpoint}: {exc}") from exc
        self.session = welcome.session
        log.info("session %d with target %s (%s engine, %s)", self.session, welcome.model, welcome.engine, welcome.dtype)
        return welcome

    @property
    def context_limit(self) -> int:
        """The most tokens one generation may hold, prompt + output (the verifier's and the draft's limit)."""
        return self.target.context_limit(self.drafter.max_positions)

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()  # frees a draft state (a llama.cpp context); the draft model stays the caller's
            self.drafter = None
        if self.session is not None and self.conn is not None:
            try:
                self.conn.request(Message(MsgType.END, fields={"session": self.session}), timeout_s=2.0)
            except transport.LinkError:
                pass
        self.session = None
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def new_session(self) -> None:
        """END this client's verifier session and open an empty one: its state goes to the verifier's
        prefix cache (any session's next prompt that starts with it takes it; a session otherwise keeps
        it for its own next prompt), or back to the shared pool. The bench calls it between prompts (and
        starts its verifier without a prefix cache), so that a row runs with only its own cells in the
        pool, as llama.cpp's row does."""
        if self.session is not None:
            try:
                self._request(Message(MsgType.END, fields={"session": self.session}))
            except VerifierError:  # already gone (reclaimed, or a restarted verifier): nothing to give back
                pass
            self.session = None
        self._hello()

    def configure(self, config: DraftConfig) -> None:
        """Draft settings for the generations that follow (a server request's own speculation settings);
        the caps it leaves open are set for the verifier's curve."""
        self.drafter_config = self.drafter.config = sized(config, self.target.verify_curve)

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        on_tokens=None,
        stop_at_eos: bool = True,
        logprobs: int | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """Speculative generation; the output is exactly the target's (greedy: same tokens;
        sampling: same distribution; with a seed, the target's own tokens for that seed), up to the
        target engine's own rounding across batch sizes (llama.cpp's quantized kernels: see the
        README's Engines section). ``on_tokens(list[int])`` sees each accepted batch. ``logprobs``:
        each token's logprob and that many alternatives (0..20) in ``Generation.logprobs``."""
        stats, out, lps = GenerationStats(n_prompt=len(input_ids)), [], []
        for tokens in self.stream(input_ids, max_new_tokens, sampling, seed, stop_at_eos, stats,
                                  logprobs=logprobs, logprobs_out=lps, grammar=grammar):
            out += tokens
            if on_tokens:
                on_tokens(tokens)
        return Generation(out, stats, lps)

    def stream(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_at_eos: bool = True,
        stats: GenerationStats | None = None,
        max_draft: int | None = None,
        logprobs: int | None = None,
        logprobs_out: list | None = None,
        grammar: str | None = None,
    ) -> Iterator[list[int]]:
        """Speculative generation as a generator: yields each batch of tokens as the target accepts
        them (the prefill's first token, then accepted + bonus per step). ``stats`` fills as it runs;
        ``max_draft`` caps the draft tokens per step (0: no drafting). ``logprobs`` (0..20): the
        verifier sends each new token's ``TokenLogprob`` with that many alternatives, appended to
        ``logprobs_out`` before its batch is yielded. ``grammar`` (``grammar.compile_grammar``):
        structured output, the target constrained to it at every token, losslessly. One generation at
        a time per Client (it owns one verifier session): starting another makes the older generator raise."""
        if logprobs is not None and logprobs_out is None:
            raise ValueError("logprobs needs a logprobs_out list to fill")
        if not input_ids:
            raise ValueError("input_ids is empty: give at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.context_limit
        if len(input_ids) >= limit:
            raise ValueError(f"the prompt has {len(input_ids)} tokens and the context holds {limit} (the verifier's "
                             "--ctx-size, or the draft's): shorten the prompt or start the verifier with a larger -c")
        if len(input_ids) + max_new_tokens > limit:  # like llama.cpp: generate until the context is full
            log.warning("%d prompt + %d new tokens pass the context of %d tokens: generating %d at most",
                        len(input_ids), max_new_tokens, limit, limit - len(input_ids))
            max_new_tokens = limit - len(input_ids)
        self._generation += 1
        stats = stats if stats is not None else GenerationStats(n_prompt=len(input_ids))
        return self._steps(list(input_ids), max_new_tokens, sampling, seed, grammar, stop_at_eos, stats,
                           self._generation, 1 << 30 if max_draft is None else max_draft, logprobs_out if
                           logprobs is not None else None, logprobs)

    def _start(self, input_ids: list[int], start: dict, stats: GenerationStats, t0: float) -> Message:
        """START (resumed on a new session if this one is gone): the prompt goes in; the reply's bonus is
        the first token, its ``cached`` the prompt tokens the verifier's prefix cache held."""
        try:
            if self.session is None:  # a new_session() that could not open one
                self._hello()
            reply = self._request(Message(MsgType.START, fields=dict(start, session=self.session, prompt=list(input_ids))))
        except (transport.LinkLost, VerifierError) as exc:
            if not self._lost(exc):
                raise
            reply = self._resume(list(input_ids), start, exc)
        stats.timings.prefill_s = stats.ttft_s = time.perf_counter() - t0
        stats.timings.grammar_s += float(reply.fields.get("grammar_s", 0.0))
        stats.n_cached = protocol.get_int(reply, "cached", 0, len(input_ids), 0)
        return reply

    def _steps(self, input_ids, max_new_tokens, sampling: SamplingParams, seed, grammar, stop_at_eos, stats,
               generation: int, max_draft: int, lps: list | None, logprobs: int | None) -> Iterator[list[int]]:
        eos = set(self.target.eos) if stop_at_eos else set()
        t0 = time.perf_counter()
        self.drafter.reset()
        start = {"temperature": float(sampling.temperature), "top_k": int(sampling.top_k), "top_p": float(sampling.top_p),
                 "seed": seed, "features": self.drafter.wants_features,
                 **({} if logprobs is None else {"logprobs": int(logprobs)}),  # only what is asked crosses the link
                 **({} if grammar is None else {"grammar": grammar})}
        reply = self._start(input_ids, start, stats, t0)
        self.drafter.observe(Feedback(reply.tensors.get("features")))
        committed, left = list(input_ids), max_new_tokens
        take = _until_done([reply.fields["bonus"]], left, eos)
        if lps is not None:
            lps += _logprobs(reply)[: len(take)]
        try:
            while take:
                committed += take
                left -= len(take)
                stats.n_generated += len(take)
                stats.record_time(time.perf_counter() - t0)
                yield take
                if left == 0 or take[-1] in eos:
                    break
                if generation != self._generation:
                    raise RuntimeError("another generation started on this Client: one at a time per Client (session)")
                # 1 draft: a chain or tree below the last committed token
                t1 = time.perf_counter()
                draft = self.drafter.propose(committed, budget=min(left - 1, max_draft))
                t2 = time.perf_counter()
                # 2 send: the verifier runs root + draft in one forward and accepts losslessly
                try:
                    reply = self._request(Message(MsgType.VERIFY, fields={
                        "session": self.session, "tokens": draft.tokens, "parents": draft.parents,
                    }))
                except (transport.LinkLost, VerifierError) as exc:
                    if not self._lost(exc):
                        raise
                    stats.resumed += 1  # the target prefills what is committed and gives the next token
                    # (a seed goes on as it was: each position has its own draw, so the text is unchanged)
                    reply = self._resume(committed, dict(start, generated=len(committed) - len(input_ids)), exc)
                    stats.timings.grammar_s += float(reply.fields.get("grammar_s", 0.0))
                    take = _until_done([reply.fields["bonus"]], left, eos)
                    if lps is not None:
                        lps += _logprobs(reply)[: len(take)]
                    continue
                t3 = time.perf_counter()
                # 3 commit: accepted tokens + the target's bonus token
                accepted, verify_s = reply.fields["accepted"], float(reply.fields.get("verify_s", 0.0))
                self.drafter.observe(Feedback(reply.tensors.get("features"), len(draft), len(accepted), verify_s, t2 - t1,
                                              protocol.get_int(reply, "rows", 0, None, 0), tuple(accepted)))
                stats.record_step(len(draft), len(accepted), t2 - t1, verify_s, t3 - t2, draft.kind,
                                  protocol.get_int(reply, "batch", 1, None, 1))
                stats.timings.grammar_s += float(reply.fields.get("grammar_s", 0.0))
                take = _until_done(accepted + [reply.fields["bonus"]], left, eos)
                if lps is not None:
                    lps += _logprobs(reply)[: len(take)]
        finally:  # done, or closed early: a drafter that keeps outputs (the lookup's index) gets the last batch
            if generation == self._generation:
                self.drafter.finish(committed)

    # ---- text convenience ---------------------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat)


def _until_done(new: list[int], left: int, eos: set) -> list[int]:
    """The new tokens up to the budget left or the first end-of-sequence token, included."""
    take = []
    for tok in new[:left]:
        take.append(tok)
        if tok in eos:
            break
    return take


def encode_prompt(tokenizer, text: str, chat: bool = False, history: list[dict] = ()) -> list[int]:
    """Prompt text -> ids; with ``chat`` the tokenizer's chat template wraps it as a user turn after the
    ``history`` messages ({"role", "content"}) before it."""
    if tokenizer is None:
        raise ValueError("no tokenizer here (the draft has none, and the target's files are not on this host): pass "
                         "token ids (or Client(tokenizer=...)), or install the target here: dovetail models install")
    if chat:
        return list(tokenizer.apply_chat_template(
            [*history, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False,
        ))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _local_tokenizer(target: str, home: Path):
    """The target's tokenizer when this host has the target's files (one host); else None: token ids only."""
    try:
        return store.load_tokenizer(target, home)
    except (FileNotFoundError, ValueError, OSError):
        log.info("no local tokenizer for target '%s': token ids only", target)
        return None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device-draft cuda was asked for but torch sees no CUDA GPU; use cpu or auto")
    return device

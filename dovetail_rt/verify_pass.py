"""One verification pass: Dovetail's verify step over every session waiting.

The VERIFYs of different sessions and the next chunks of the prompts going in run through ONE
forward of the target (a CPU pass over several sessions' tokens costs far less than the passes
apart); then each session, alone and exactly as it would alone:

  1 forward   its root + draft tree (or prompt chunk), seeing only its own cache and ancestors
  2 accept    the longest path the target agrees with, and the target's own bonus token after it
  3 commit    the root and that path stay in its cache, the rest of the tree goes
  4 reply     RESULT: accepted tokens, bonus, features and logprobs when asked

This module owns the pass and the per-session state it reads (``Session``, ``Prefill``, ``Work``);
``verifier.Verifier`` owns sockets, sessions, admission and replies, and calls ``run_pass``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from . import grammar, lm, protocol, sampling
from .protocol import Message, MsgType, ProtocolError

log = logging.getLogger(__name__)


@dataclass
class Session:
    id: int
    identity: bytes
    host: str | None = None  # the authorized host that opened it (CURVE: its key file's name)
    state: lm.Session | None = None  # the target's KV cache for this session (committed tokens)
    tokens: list[int] = field(default_factory=list)  # what ``state`` holds (for the prefix cache)
    root: int | None = None  # last committed token, not yet run by the target
    params: sampling.SamplingParams = sampling.SamplingParams()
    seed: int = 0  # sampling: token i of the sequence is drawn with sampling.uniform(seed, i)
    logprobs: int | None = None  # None: none; k >= 0: each new token's logprob and the k most likely
    want_features: bool = False
    constraint: "grammar.Constraint | None" = None  # structured output: the grammar's state after the root
    grammar_s: float = 0.0  # time spent on the grammar (cut, masks) since the last RESULT
    last_used: float = field(default_factory=time.monotonic)
    prefill: "Prefill | None" = None  # a START whose prompt is still going in, a chunk per pass


@dataclass
class Prefill:
    """A START being answered: its prompt goes into the cache a chunk per pass, between (and in the
    same forward as) other sessions' steps, so a long prompt never stalls them for long."""

    identity: bytes
    seq: int  # the START's, for its reply
    left: list[int]  # prompt tokens not yet in the cache
    started: float = field(default_factory=time.perf_counter)
    features: list = field(default_factory=list)  # [n, d] per chunk, when the session wants features
    cached: int = 0  # prompt tokens its state already held (the prefix cache), not in ``left``


@dataclass
class Work:
    """One session's share of a pass: a VERIFY (root + draft tree) or a chunk of a prompt."""

    identity: bytes
    seq: int
    session: Session
    tokens: list[int]
    parents: list[int] | None  # None: a prompt chunk (a chain after the committed tokens)
    rows: int | None = None  # logits wanted: None = every node (VERIFY); a chunk: 1 if it ends the prompt, else 0


def run_pass(target: lm.LM, work: list[Work], make_room=lambda: False) -> list[tuple[Work, Message | ProtocolError]]:
    """Every item's answer: its RESULT, a refusal (``ProtocolError``, the session as it was), or an
    ``internal`` error (the session must START again). A prompt chunk that is not the last gets none.
    Items the engine had no room for in one forward run in the next, until all have run; one that finds
    no room even alone runs again while ``make_room()`` frees some (the prefix cache's states)."""
    answers = []
    while work:
        group, work = (work, []) if target.info.batches else (work[:1], work[1:])
        t0 = time.perf_counter()
        try:  # 1 forward: each session's root + draft nodes (or prompt chunk), seeing only its own cache and ancestors
            outs = target.forward_batch([(w.session.state, w.tokens, w.parents, w.rows) for w in group])
        except Exception as exc:  # this group's requests get errors; answers for earlier groups stand
            log.exception("internal error in a pass")
            answers += [(w, internal(w, exc)) for w in group]
            continue
        seconds = time.perf_counter() - t0
        ran = [w.tokens for w, o in zip(group, outs) if isinstance(o, lm.Output)]
        shared = {"batch": len(ran), "rows": sum(map(len, ran))}  # sessions and tokens in this pass
        for w, out in zip(group, outs):
            if out is None and any(o is not None for o in outs):  # no room in this pass: the next one
                work.append(w)
                continue
            if (out is None or isinstance(out, lm.CacheFull)) and make_room():  # room taken from the cache
                work.append(w)
                continue
            answer = settle(w, out, seconds, shared)
            if answer is not None:
                answers.append((w, answer))
    return answers


def settle(w: Work, out, seconds: float, shared: dict) -> Message | ProtocolError | None:
    """Steps 2-4 for one session after the forward (``out``: its Output, or what refused it)."""
    try:
        if not isinstance(out, lm.Output):  # refused (or no room even alone)
            return refused(out or lm.CacheFull("no room in the KV cache"), w)
        if w.parents is not None:
            return commit_verify(w, out, seconds, shared)
        return commit_chunk(w, out)
    except Exception as exc:  # one session's failure must not cost the others their replies
        log.exception("internal error committing session %d's step", w.session.id)
        return internal(w, exc)


def commit_verify(w: Work, out: lm.Output, seconds: float, shared: dict) -> Message:
    s, tokens = w.session, w.tokens
    # 2 accept: longest agreeing path + the target's own bonus token
    path, bonus = accept(s, tokens, w.parents, out.logits, s.state.length + 1)  # the root is at length
    # 3 commit: keep the root and the accepted path in the cache
    keep = [0] + path
    s.state.keep(keep)
    s.tokens += [tokens[k] for k in keep]
    s.root = bonus
    # 4 reply: accepted tokens, bonus, features of root + accepted positions
    features = None if out.features is None else out.features[keep]
    return result(s, [tokens[k] for k in path], bonus, features, seconds, out.logits[keep], **shared)


def commit_chunk(w: Work, out: lm.Output) -> Message | None:
    """A prompt chunk went in: keep it; after the last one sample the first token and answer the START."""
    s, p = w.session, w.session.prefill
    s.last_used = time.monotonic()  # a long prompt going in is not idle
    s.state.keep(list(range(len(w.tokens))))
    s.tokens += w.tokens
    del p.left[: len(w.tokens)]
    if out.features is not None:
        p.features.append(out.features)
    if p.left:
        return None
    _, first = accept(s, [0], [-1], out.logits, s.state.length)
    s.root, s.prefill = first, None
    features = torch.cat(p.features) if p.features else None
    reply = result(s, [], first, features, time.perf_counter() - p.started, out.logits[-1:])
    reply.fields["cached"] = p.cached  # prompt tokens the prefix cache gave (not prefilled)
    return reply


def accept(s: Session, tokens, tree, logits, position: int) -> tuple[list[int], int]:
    """The accepted path and the bonus; ``position``: the sequence index of the token after the root."""
    if s.constraint is not None:
        t0 = time.perf_counter()
        try:
            return sampling.accept_walk(tokens, tree, constrained_choice(s, logits, position))
        finally:
            s.grammar_s += time.perf_counter() - t0
    if s.params.greedy:
        return sampling.accept_greedy(tokens, tree, logits.argmax(-1).tolist())
    p = sampling.processed_probs(logits, s.params)  # [q, V]
    return sampling.accept_sampling(tokens, tree, p, s.seed, position)


def constrained_choice(s: Session, logits, position: int):
    """The target's own token at each node of the walk under the session's grammar: its logits
    masked to what the grammar allows there, then greedy, or processed (temperature, top-k, top-p)
    and drawn with the seeded uniform of that position; the grammar consumes each token chosen."""
    c = s.constraint

    def choose(node: int, depth: int) -> int:
        row = c.masked(logits[node])
        if s.params.greedy:
            x = int(row.argmax())
        else:
            p = sampling.processed_probs(row[None], s.params)[0]
            x = sampling.inverse_cdf(p, sampling.uniform(s.seed, position + depth))
        c.consume(x)
        return x

    return choose


def result(s: Session, accepted, bonus, hidden, seconds, logits, batch: int = 1, rows: int = 0) -> Message:
    """RESULT; ``logits``: the rows that chose accepted + [bonus] (their logprobs go out when asked)."""
    msg = Message(MsgType.RESULT, fields={
        "session": s.id, "accepted": accepted, "bonus": bonus, "verify_s": seconds, "past_len": s.state.length,
        "batch": batch, "rows": rows,  # sessions and tokens in the forward pass that verified this step
    })
    if s.constraint is not None:  # what the grammar cost this step (masks, the draft's cut)
        msg.fields["grammar_s"], s.grammar_s = s.grammar_s, 0.0
    if s.want_features and hidden is not None:
        msg.tensors["features"] = hidden.to(torch.float16)  # [n, d]
    if s.logprobs is not None:
        msg.tensors.update(sampling.logprobs(logits, accepted + [bonus], s.logprobs))
    return msg


def refused(exc: Exception, w: Work) -> ProtocolError:
    """The error for a forward the engine refused; a refused prompt chunk ends that START."""
    if w.parents is None:
        w.session.prefill = None
        w.session.state.truncate(0)
        w.session.tokens = []
    if isinstance(exc, lm.CacheFull):
        return ProtocolError(str(exc), "kv_full")
    if isinstance(exc, ValueError):  # a tree this engine cannot run in one pass
        return ProtocolError(str(exc), "bad_tree")
    return ProtocolError(f"{type(exc).__name__}: {exc}", "internal")


def internal(w: Work, exc: Exception) -> Message:
    """The reply to a step that failed inside the verifier; its session must START again."""
    w.session.prefill, w.session.root, w.session.tokens = None, None, []  # what its state holds is unknown now
    return protocol.internal_error(w.seq, exc)

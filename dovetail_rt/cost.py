"""How long a draft should be: maximise expected tokens per second (the Dovetail cost model).

    rate(k) = E[tokens per step | k drafted] / (k * T_D + T_V(k + 1))
    E[tokens | k] = 1 + sum_{j<=k} P(first j draft tokens all accepted)

T_V(q) is the verifier's forward time over q tokens (root + k drafts): a prior from the
verifier's measured curve (``dovetail bench --verify-curve``, sent in WELCOME) refined online
from the ``verify_s`` of every step; T_D is the draft's time per token, measured online.
Sessions batched in one pass: a step's q tokens ride with ``others`` rows of other sessions (as in
the last pass), so its cost is T_V(others + q), learned at the pass's whole row count; where the
curve flattens with rows (a CPU past its GEMV regime), a busy verifier makes longer drafts pay. The
acceptance chance of each draft token is the draft's own probability times a running calibration
per depth (accepted over predicted).

Trees: once a tree is grown its draft time is spent, so only verification depends on its size:
keep the n best nodes maximising (1 + sum_{i<=n} P(node i accepted)) / (T_grow + T_V(n + 1)),
with P(node) = exp(cumulative draft log-prob) times the calibration of its depth (a chain is a
tree whose depths are its positions).

Drafting off: when even the best draft length, at the acceptance measured so far per depth, is
expected to give fewer tokens per second than the target alone (1 / T_V(1)), ``worth_drafting``
says no and the draft does not run at all that step: no catch-up of the draft model either, so a
step costs what a plain target step costs (on 2 cores with a 4-bit target, verifying 2 tokens
costs ~1.8x one and a 0.5B draft token a third of a target step: nothing pays there).

Probes: the calibration learns only from drafted tokens, so a bad stretch that sends it to its
floor would switch drafting off for good. After ``probe_every`` steps in a row without a draft
(PROBE_EVERY at first, doubling after each probe that does not switch drafting back on, up to
PROBE_MAX), the next step drafts at least one token (its cost: the draft's catch-up, one draft
token and one more verified position).

Hopeless: where even a draft right ALPHA_MAX of the time cannot beat the target alone (every k:
sum_{j<=k} ALPHA_MAX^j / (k * T_D + T_V(k + 1)) <= 1 / T_V(1); e.g. a 0.5B draft on the same 2
cores as a 4-bit 1.5B target: T_D a third of a step, T_V(2) 1.8 steps), a probe can only find what
the measured acceptance would have shown anyway, and each one costs the draft's catch-up over
every token since the last: no probes then (a draft measured above ALPHA_MAX still drafts).
Re-judged every step, so a pass that gets flatter (more sessions batched) brings probes back.

A probe's price: a model draft that has not run since drafting stopped (or since the generation
began) must first catch up over every token it missed, the prompt included. A probe is sent only
when that catch-up, at the draft's measured prefill time per token (``t_catch``), costs at most
PROBE_SHARE of the target's time over the idle steps it follows; a draft whose prefill is not
measured yet probes as before (the probe measures it). On 2 cores a 0.5B draft prefills a token in
about a tenth of a target step, so a probe there never pays for a prompt's catch-up; a GPU draft
does it for a thousandth.
"""

from __future__ import annotations

import math
from dataclasses import replace

from . import tree
from .config import DRAFT_MAX, FLAT, TREE_TOKENS, WIDEST, DraftConfig

EMA = 0.2
PROBE_EVERY = 16
PROBE_MAX = 256
ALPHA_MAX = 0.9  # per-token acceptance a model draft is credited with when judging probes (see the module's doc)
PROBE_SHARE = 0.05  # the most of the idle steps' target time that a probe's catch-up may cost
CATCH_MIN = 8  # tokens in a catch-up that make it a prefill (its time per token is t_catch)


def flat_width(verify_curve: dict | None) -> int:
    """The largest measured q (<= WIDEST) that verifies for at most FLAT one-token steps; 1 for no curve.
    On 2 cores with a 4-bit llama.cpp target it is 2 (AMD EPYC, DESIGN.md §7); torch bfloat16 on an
    AMX Xeon verifies 32 tokens for 1.2x one (§8)."""
    curve = {int(q): float(t) for q, t in (verify_curve or {}).items()}
    if 1 not in curve:
        return 1
    return max([q for q, t in curve.items() if q <= WIDEST and t <= FLAT * curve[1]], default=1)


def sized(config: DraftConfig, verify_curve: dict | None) -> DraftConfig:
    """``config`` with the caps it leaves open (draft_max / tree_tokens None) set for this curve:
    DRAFT_MAX / TREE_TOKENS where the curve is steep or unknown, as wide as the curve stays flat (up to
    WIDEST) where it is flat. The caps only bound what a draft may grow: the cost model still sizes
    every draft below them from the curve, the draft time and the acceptance."""
    width = flat_width(verify_curve)
    return replace(config,
                   draft_max=max(DRAFT_MAX, width) if config.draft_max is None else config.draft_max,
                   tree_tokens=max(TREE_TOKENS, width) if config.tree_tokens is None else config.tree_tokens)


class CostModel:
    def __init__(self, verify_curve: dict | None = None):
        self.t_verify = {int(q): float(t) for q, t in (verify_curve or {}).items()}
        self.t_draft: float | None = None  # seconds per draft token
        self.t_catch: float | None = None  # seconds per token of a long catch-up (a prefill) of the draft
        self.predicted: list[float] = []  # per depth: running sums of predicted / accepted
        self.accepted: list[float] = []
        self.reached: list[float] = []  # per depth: running count of steps that drafted that deep
        self.idle_steps = 0  # steps in a row that drafted nothing
        self.probe_every = PROBE_EVERY
        self.others = 0  # rows of other sessions in the last verifier pass

    @property
    def knows_verify(self) -> bool:
        return len(self.t_verify) >= 2

    @property
    def ready(self) -> bool:
        return self.t_draft is not None and self.knows_verify

    @property
    def probing(self) -> bool:
        """Draft at least one token this step, whatever the rate says (see the module's doc)."""
        return self.idle_steps >= self.probe_every

    def hopeless(self, max_tokens: int) -> bool:
        """Whether no chain of up to ``max_tokens`` draft tokens, each accepted with ALPHA_MAX, would beat
        the target alone (a tree's best path is such a chain, verified with more nodes: no better)."""
        alone, expected = 1.0 / self.pass_time(1), 1.0
        for k in range(1, max_tokens + 1):
            expected += ALPHA_MAX ** k
            if expected / (k * self.t_draft + self.pass_time(k + 1)) > alone:
                return False
        return True

    def affordable(self, behind: int) -> bool:
        """Whether a probe's catch-up over ``behind`` missed tokens costs at most PROBE_SHARE of the target's
        time over the idle steps since drafting stopped (True while the draft's prefill is unmeasured)."""
        return self.t_catch is None or behind * self.t_catch <= PROBE_SHARE * self.idle_steps * self.pass_time(1)

    def worth_drafting(self, max_tokens: int, tree_tokens: int | None = None, behind: int = 0) -> bool:
        """Whether any draft of up to ``max_tokens`` tokens (a chain; or a tree verified as
        ``tree_tokens`` nodes) is expected to beat the target alone, at the acceptance measured per
        depth; True until that is measured, and on a probe unless probes are ``hopeless`` or the
        draft's catch-up over the ``behind`` tokens it has not run is not ``affordable``."""
        if not self.ready or not self.reached:
            return True
        if self.probing and not self.hopeless(max_tokens) and self.affordable(behind):
            return True
        alone = 1.0 / self.pass_time(1)
        expected, depth = 1.0, 0
        for k in range(1, max_tokens + 1):
            if depth < len(self.reached) and self.reached[depth] > 0.5:
                expected += self.accepted[depth] / self.reached[depth]  # P(accepted length >= k)
                depth += 1
            q = (tree_tokens if tree_tokens else k + 1)
            if expected / ((k + 1) * self.t_draft + self.pass_time(q)) > alone:
                return True
        return False

    def calibration(self, depth: int) -> float:
        """accepted / predicted at this draft depth (1 = the root's children). Draft probabilities
        drift from the truth differently at each depth (errors compound down a path), so each
        depth has its own factor; a depth without enough steps yet borrows the one above it."""
        c = 1.0
        for d in range(min(depth, len(self.predicted))):
            if self.predicted[d] >= 1.0:
                c = min(max(self.accepted[d] / self.predicted[d], 0.05), 2.0)
        return c

    def observe(self, n_drafted: int, n_accepted: int, predicted: list[float], verify_s: float, draft_s: float,
                catch_up: tuple[float, int] = (0.0, 0), rows: int = 0) -> None:
        """One verified step. ``predicted[d]``: the draft's own (uncalibrated) chances summed over
        the nodes at depth d + 1, i.e. its estimate of P(accepted length > d). ``catch_up``: the
        seconds and tokens of the draft's catch-up inside ``draft_s``; a long one (the prompt, or the
        tokens after drafting was off) is counted as the usual two-token catch-up, since it is not what
        the next draft token costs (counted whole, it switched drafting off for good on step one)."""
        caught_s, caught_n = catch_up
        if caught_n >= CATCH_MIN:  # a prefill: what the next probe's catch-up will cost per token
            per = caught_s / caught_n
            self.t_catch = per if self.t_catch is None else (1 - EMA) * self.t_catch + EMA * per
        draft_s = max(draft_s - caught_s * (1 - min(2, caught_n) / max(caught_n, 1)), 0.0)
        q = n_drafted + 1
        if n_drafted and self.probing:  # a probe: wait longer for the next unless drafting pays again
            self.probe_every = min(2 * self.probe_every, PROBE_MAX)
        elif n_drafted:
            self.probe_every = PROBE_EVERY
        self.idle_steps = 0 if n_drafted else self.idle_steps + 1
        self.observe_pass(q, rows, verify_s)
        if not n_drafted and draft_s < 1e-3:  # the draft did not run (drafting off): no draft time to learn
            return
        per_token = draft_s / (n_drafted + 1)  # one catch-up forward + one per drafted token
        self.t_draft = per_token if self.t_draft is None else (1 - EMA) * self.t_draft + EMA * per_token
        for d, p in enumerate(predicted if n_drafted else []):
            if d == len(self.predicted):
                self.predicted.append(0.0), self.accepted.append(0.0), self.reached.append(0.0)
            self.predicted[d] = (1 - EMA) * self.predicted[d] + p
            self.accepted[d] = (1 - EMA) * self.accepted[d] + (n_accepted > d)
            self.reached[d] = (1 - EMA) * self.reached[d] + 1.0

    def observe_pass(self, q: int, rows: int, seconds: float) -> None:
        """A pass of ``rows`` tokens (0: just this step's ``q``) took ``seconds``: T_V(rows), and the
        rows the next step will likely share its pass with."""
        rows = max(rows, q)
        self.others = rows - q
        self.observe_verify(rows, seconds)

    def observe_verify(self, q: int, seconds: float) -> None:
        """One measured T_V(q): a running average per q."""
        old = self.t_verify.get(q)
        self.t_verify[q] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def verify_time(self, q: int) -> float:
        """Measured T_V(q), interpolated / extrapolated linearly between the known points."""
        pts = sorted(self.t_verify.items())
        if q in self.t_verify:
            return self.t_verify[q]
        lower = [p for p in pts if p[0] < q]
        upper = [p for p in pts if p[0] > q]
        if lower and upper:
            (q0, t0), (q1, t1) = lower[-1], upper[0]
        elif len(lower) >= 2:
            (q0, t0), (q1, t1) = lower[-2], lower[-1]
        else:
            (q0, t0), (q1, t1) = upper[0], upper[1]
        slope = max((t1 - t0) / (q1 - q0), 0.0)
        return max(t0 + slope * (q - q0), 1e-6)

    def pass_time(self, q: int) -> float:
        """What verifying q tokens of this session costs: a pass with the other sessions' rows."""
        return self.verify_time(q + self.others)

    def rate(self, p_all: list[float]) -> float:
        """Expected tokens per second when drafting len(p_all) tokens; p_all[j] = P(first j+1 accepted)."""
        k = len(p_all)
        return (1.0 + sum(p_all)) / (k * self.t_draft + self.pass_time(k + 1))

    def extend_chain(self, p_all: list[float], p_next: float) -> bool:
        """Whether drafting one more chain token (acceptance chance ``p_next``) raises the expected
        rate, or is the probe's one token (see the module's doc)."""
        return self.rate(p_all + [p_next]) >= self.rate(p_all) or (not p_all and self.probing)

    def tree_size(self, chances: list[float], grow_s: float) -> int:
        """How many of a grown tree's best nodes to send (0..len(chances), at least 1 when probing);
        needs the curve."""
        best_n, best, expected = 0, 1.0 / (grow_s + self.pass_time(1)), 1.0
        for n, p_n in enumerate(sorted(chances, reverse=True), start=1):
            expected += p_n
            rate = expected / (grow_s + self.pass_time(n + 1))
            if rate > best:
                best_n, best = n, rate
        return max(best_n, min(len(chances), int(self.probing)))

    def node_chances(self, scores: list[float], parents: list[int]) -> list[float]:
        """P(node accepted) for draft nodes 1..n (wire layout: ``parents[i - 1]`` of node i, 0 = the
        root) with cumulative draft log-probs ``scores``: exp(score) times its depth's calibration,
        never above its parent's, so the most likely nodes always include their ancestors."""
        chances: list[float] = []
        for score, parent, depth in zip(scores, parents, tree.depths(parents)):
            cap = chances[parent - 1] if parent else 1.0
            chances.append(min(cap, math.exp(score) * self.calibration(depth)))
        return chances


def raw_chances_by_depth(scores: list[float], parents: list[int]) -> list[float]:
    """The draft's own chances, exp(cumulative log-prob), summed per depth: what
    ``CostModel.observe`` compares with the accepted lengths."""
    node_depths = tree.depths(parents)
    sums = [0.0] * max(node_depths, default=0)
    for score, depth in zip(scores, node_depths):
        sums[depth - 1] += math.exp(score)
    return sums

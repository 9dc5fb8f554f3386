"""How long a draft should be: maximise expected tokens per second (the Dovetail cost model).

    rate(k) = E[tokens per step | k drafted] / (k * T_D + T_V(k + 1))
    E[tokens | k] = 1 + sum_{j<=k} P(first j draft tokens all accepted)

T_V(q) is the verifier's forward time over q tokens (root + k drafts): a prior from the
verifier's measured curve (``dovetail bench --verify-curve``, sent in WELCOME) refined online
from the ``verify_s`` of every step; T_D is the draft's time per token, measured online. The
acceptance chance of each draft token is the draft's own probability times a running calibration.

Trees: once a tree is grown its draft time is spent, so only verification depends on its size:
keep the n best nodes maximising (1 + sum_{i<=n} P(node i accepted)) / (T_grow + T_V(n + 1)),
with P(node) = exp(cumulative draft log-prob) times the calibration.
"""

from __future__ import annotations

import math

EMA = 0.2


class CostModel:
    def __init__(self, verify_curve: dict | None = None):
        self.t_verify = {int(q): float(t) for q, t in (verify_curve or {}).items()}  # q -> seconds
        self.t_draft: float | None = None  # seconds per draft token
        self.predicted = self.accepted = 0.0  # running sums for the calibration

    @property
    def knows_verify(self) -> bool:
        return len(self.t_verify) >= 2

    @property
    def ready(self) -> bool:
        return self.t_draft is not None and self.knows_verify

    @property
    def calibration(self) -> float:
        if self.predicted < 1.0:
            return 1.0
        return min(max(self.accepted / self.predicted, 0.25), 2.0)

    def observe(self, n_drafted: int, n_accepted: int, predicted: float, verify_s: float, draft_s: float) -> None:
        q = n_drafted + 1
        old = self.t_verify.get(q)
        self.t_verify[q] = verify_s if old is None else (1 - EMA) * old + EMA * verify_s
        per_token = draft_s / (n_drafted + 1)  # one catch-up forward + one per drafted token
        self.t_draft = per_token if self.t_draft is None else (1 - EMA) * self.t_draft + EMA * per_token
        if n_drafted:
            self.predicted = (1 - EMA) * self.predicted + predicted
            self.accepted = (1 - EMA) * self.accepted + n_accepted

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

    def rate(self, p_all: list[float]) -> float:
        """Expected tokens per second when drafting len(p_all) tokens; p_all[j] = P(first j+1 accepted)."""
        k = len(p_all)
        return (1.0 + sum(p_all)) / (k * self.t_draft + self.verify_time(k + 1))

    def tree_size(self, scores: list[float], grow_s: float) -> int:
        """How many of a grown tree's best nodes to send (0..len(scores)); needs the curve."""
        p = sorted(self.node_chances(scores), reverse=True)
        best_n, best, expected = 0, 1.0 / (grow_s + self.verify_time(1)), 1.0
        for n, p_n in enumerate(p, start=1):
            expected += p_n
            rate = expected / (grow_s + self.verify_time(n + 1))
            if rate > best:
                best_n, best = n, rate
        return best_n

    def node_chances(self, scores: list[float]) -> list[float]:
        """P(node accepted) for tree nodes with these cumulative draft log-probs."""
        return [min(1.0, math.exp(sc) * self.calibration) for sc in scores]

    def expected_accepted(self, scores: list[float]) -> float:
        return sum(self.node_chances(scores))

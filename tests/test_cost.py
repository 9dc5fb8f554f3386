"""The draft-length cost model: interpolation of T_V(q) and the expected-throughput rule."""

import pytest

from dovetail_rt.config import DRAFT_MAX, TREE_TOKENS, DraftConfig
from dovetail_rt.cost import CostModel, flat_width, sized

# bf16 1.5B forward times on the 2-core dev machine (DESIGN.md section 4), seconds
CURVE = {1: 0.218, 2: 0.239, 4: 0.286, 8: 0.371, 16: 0.512}


def test_verify_time_interpolates_and_extrapolates():
    cost = CostModel(CURVE)
    assert cost.verify_time(4) == pytest.approx(0.286)
    assert cost.verify_time(3) == pytest.approx((0.239 + 0.286) / 2)
    assert cost.verify_time(32) == pytest.approx(0.512 + 16 * (0.512 - 0.371) / 8)


def test_not_ready_until_draft_time_is_measured():
    cost = CostModel(CURVE)
    assert not cost.ready
    cost.observe(n_drafted=3, n_accepted=2, predicted=[0.9, 0.7, 0.4], verify_s=0.28, draft_s=0.16)
    assert cost.ready and cost.t_draft == pytest.approx(0.04)


def test_longer_drafts_pay_only_while_acceptance_is_likely():
    cost = CostModel(CURVE)
    cost.observe(3, 3, [1.0, 1.0, 1.0], 0.28, 0.16)  # 40 ms per draft token
    confident = [0.95 ** (j + 1) for j in range(8)]
    unsure = [0.3 ** (j + 1) for j in range(8)]
    best = lambda p: max(range(9), key=lambda k: cost.rate(p[:k]))
    assert best(confident) >= 5
    assert best(unsure) <= 1


def test_calibration_follows_observed_acceptance_per_depth():
    cost = CostModel(CURVE)
    for _ in range(20):  # the draft expects 0.9 / 0.8 / 0.6 at depths 1-3; its first token always
        cost.observe(3, 1, [0.9, 0.8, 0.6], 0.3, 0.2)  # lands, never the second
    assert cost.calibration(1) == pytest.approx(1 / 0.9, rel=0.05)
    assert cost.calibration(2) == 0.05  # the floor
    assert cost.calibration(5) == cost.calibration(3)  # no data that deep: the depth above's
    assert CostModel(CURVE).calibration(1) == 1.0
    cost.observe(0, 0, [0.9], 0.2, 0.01)  # nothing drafted (a tree cut to zero): nothing learned
    assert cost.calibration(1) == pytest.approx(1 / 0.9, rel=0.05)


def test_tree_size_keeps_nodes_while_they_pay_for_their_verification():
    import math

    cost = CostModel(CURVE)
    chain = list(range(15))  # node i + 1's parent is node i
    likely = cost.node_chances([math.log(0.9 ** (j + 1)) for j in range(15)], chain)  # deep, confident
    unlikely = cost.node_chances([math.log(0.05)] * 15, [0] * 15)  # fifteen long shots
    assert cost.tree_size(likely, grow_s=0.1) >= 8
    assert cost.tree_size(unlikely, grow_s=0.1) == 0


def test_node_chances_never_exceed_their_parents():
    """Depth 2 calibrated far above depth 1: a child still ranks below its parent, so pruning by
    chance keeps every kept node's ancestors."""
    import math

    from dovetail_rt.cost import raw_chances_by_depth

    cost = CostModel(CURVE)
    for _ in range(20):
        cost.observe(2, 2, [0.9, 0.5], 0.3, 0.2)
    scores, parents = [math.log(0.9), math.log(0.45), math.log(0.05)], [0, 1, 0]
    chances = cost.node_chances(scores, parents)
    assert chances[1] <= chances[0] and cost.calibration(2) > cost.calibration(1)
    assert raw_chances_by_depth(scores, parents) == pytest.approx([0.95, 0.45])


def test_pruned_tree_is_a_tree_of_the_best_nodes():
    import torch

    from dovetail_rt import tree

    gen = torch.Generator().manual_seed(1)
    grown = tree.grow(torch.randn(40, generator=gen).log_softmax(-1),
                      lambda nodes, *_: torch.randn(len(nodes), 40, generator=gen).log_softmax(-1), 3, 4, 16)
    for n in range(len(grown) + 1):
        t = tree.prune(grown, n)
        assert len(t) == n and all(0 <= p < i for i, p in enumerate(t.parents, start=1))
        assert sorted(t.scores, reverse=True) == sorted(grown.scores, reverse=True)[:n]
        assert set(_paths(t)) <= set(_paths(grown)), "every kept node keeps its own ancestors"
    cost = CostModel(CURVE)  # ranked by calibrated chances (deeper nodes boosted) instead of scores
    for _ in range(20):
        cost.observe(4, 4, [0.5, 0.2, 0.1, 0.05], 0.3, 0.2)
    chances = cost.node_chances(grown.scores, grown.parents)
    for n in range(len(grown) + 1):
        t = tree.prune(grown, n, chances)
        assert len(t) == n and set(_paths(t)) <= set(_paths(grown))


def _paths(t):
    """Each node's token path from the root, with its score."""
    paths = []
    for tok, parent, score in zip(t.tokens, t.parents, t.scores):
        paths.append(((paths[parent - 1][0] if parent else ()) + (tok,), score))
    return paths


def test_a_draft_switched_off_is_probed_again():
    """A bad stretch sends the calibration to its floor and drafting stops; every PROBE_EVERY idle
    steps one token is drafted anyway, so good acceptance can switch drafting back on."""
    from dovetail_rt.cost import PROBE_EVERY

    cost = CostModel(CURVE)
    for _ in range(20):
        cost.observe(1, 0, [0.5], 0.24, 0.08)  # the draft is always wrong
    long_shot = cost.node_chances([-0.7], [0])  # the draft says 0.5; calibrated: the floor
    assert cost.tree_size(long_shot, grow_s=0.04) == 0 and not cost.probing
    assert not cost.extend_chain([], long_shot[0])
    for _ in range(PROBE_EVERY):
        cost.observe(0, 0, [], 0.22, 0.04)
    assert cost.probing and cost.tree_size(long_shot, grow_s=0.04) == 1
    assert cost.extend_chain([], long_shot[0])  # a chain's probe is its first token only
    assert not cost.extend_chain(long_shot, long_shot[0] * 0.5)
    assert cost.tree_size([], grow_s=0.04) == 0  # nothing grown, nothing to send
    for _ in range(10):  # the probes land: the calibration recovers
        cost.observe(1, 1, [0.5], 0.24, 0.08)
    assert not cost.probing and cost.calibration(1) > 1.0


def test_drafting_switches_off_where_verifying_costs_more_than_it_earns():
    """The 4-bit curve measured here (llamacpp Q4_K_M, ms): verifying 2 tokens costs 1.8x one; with a
    draft token at a third of a step, no chain pays even at 80 % acceptance. The BF16 file's flat
    curve pays at the same acceptance. With drafting off the draft does not run, and probes come
    ever more rarely while they keep failing."""
    from dovetail_rt.cost import PROBE_EVERY

    q4 = {1: 0.043, 2: 0.078, 3: 0.103, 4: 0.132, 6: 0.148, 8: 0.279, 16: 0.378}
    bf16 = {1: 0.112, 2: 0.142, 3: 0.150, 4: 0.171, 6: 0.185, 8: 0.223, 16: 0.325}
    for curve, pays in ((q4, False), (bf16, True)):
        cost = CostModel(curve)
        for _ in range(10):  # 4-token chains, 80 % of tokens accepted at each depth
            cost.observe(4, 3, [0.9, 0.8, 0.7, 0.6], curve[4] if 4 in curve else 0.15, 5 * 0.015)
        assert cost.worth_drafting(8) is pays
    # a draft that could pay if it were right (1 ms a token: a GPU's), wrong every time: probes, ever rarer
    cost = CostModel(q4)
    for _ in range(10):
        cost.observe(4, 0, [0.9, 0.8, 0.7, 0.6], 0.132, 5 * 0.001)
    probes = []
    for step in range(200):
        drafts = cost.worth_drafting(8)
        probes += [step] if drafts else []
        cost.observe(1 if drafts else 0, 0, [0.5] if drafts else [], 0.078 if drafts else 0.043, 0.002 if drafts else 0.0)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == PROBE_EVERY and gaps == sorted(gaps) and gaps[-1] > 2 * PROBE_EVERY


def test_a_draft_that_cannot_pay_even_when_nearly_always_right_is_never_probed():
    """The curve of `dovetail models install` on a 2-core AVX2 AMD EPYC (Zen 3; llama.cpp Q4_K_M, s) and a
    0.5B draft token at a third of a step: at 90 % acceptance per token no chain beats the target alone,
    so a probe (which makes the draft catch up over every token since the last one) cannot find a
    better rate than the steps measured; none is sent. The same draft measured right every time drafts."""
    from dovetail_rt.cost import PROBE_EVERY

    zen3 = {1: .077, 2: .140, 3: .180, 4: .240, 6: .354, 8: .540, 12: 1.013, 16: .543, 24: 1.115, 32: 1.122}
    cost = CostModel(zen3)
    for _ in range(10):  # the first steps draft (nothing measured yet): wrong
        cost.observe(4, 0, [0.9, 0.8, 0.7, 0.6], 0.240, 5 * 0.026)
    assert cost.hopeless(16)
    drafted = [step for step in range(20 * PROBE_EVERY) if cost.worth_drafting(16) or cost.observe(0, 0, [], 0.077, 0.0)]
    assert drafted == [] and cost.probing
    right = CostModel(zen3)
    for _ in range(10):  # the same draft, every token accepted: its measured rate pays (16 tokens in 1.0 s)
        right.observe(15, 15, [1.0] * 15, 0.543, 16 * 0.026)
    assert right.hopeless(16) and right.worth_drafting(16)


# measured curves (ms; DESIGN.md §7 and §8): llama.cpp Q4_K_M on the 2-core AMD EPYC, torch bfloat16 on
# the 2-core AMX Xeon
STEEP = {1: 26.8, 2: 49.0, 4: 80.0, 8: 131.5, 12: 162.6, 16: 158.6, 24: 244.7, 32: 285.8}
FLAT = {1: 227.3, 2: 224.2, 4: 225.6, 8: 223.9, 16: 242.4, 32: 275.2}


def test_draft_caps_widen_where_the_curve_is_flat():
    assert flat_width(STEEP) == 2 and flat_width(FLAT) == 32 and flat_width(None) == 1
    assert (sized(DraftConfig(), None).draft_max, sized(DraftConfig(), None).tree_tokens) == (DRAFT_MAX, TREE_TOKENS)
    assert (sized(DraftConfig(), STEEP).draft_max, sized(DraftConfig(), STEEP).tree_tokens) == (DRAFT_MAX, TREE_TOKENS)
    assert (sized(DraftConfig(), FLAT).draft_max, sized(DraftConfig(), FLAT).tree_tokens) == (32, 32)
    mine = DraftConfig(draft_max=5, tree_tokens=6)  # caps the user set stay
    assert (sized(mine, FLAT).draft_max, sized(mine, FLAT).tree_tokens) == (5, 6)


def test_a_likely_wide_draft_is_sent_whole_only_on_a_flat_curve():
    chances = [0.97 ** (j + 1) for j in range(31)]  # a long lookup match
    flat, steep = CostModel({q: t / 1000 for q, t in FLAT.items()}), CostModel({q: t / 1000 for q, t in STEEP.items()})
    assert flat.tree_size(chances, 0.0) == 31
    assert steep.tree_size(chances, 0.0) < 31


def test_every_draft_kind_takes_the_wide_caps_from_its_curve():
    from dovetail_rt.ngram import Lookup, NgramDrafter

    drafter = NgramDrafter(Lookup(), DraftConfig(adaptive=False), {q: t / 1000 for q, t in FLAT.items()})
    assert drafter.config.draft_max == 32
    context = list(range(40)) * 3  # the prompt repeats itself: the lookup may propose 32 tokens (unsized)
    assert len(drafter.propose(context, budget=100).tokens) > DRAFT_MAX


def test_a_lookup_tree_branches_into_every_continuation_only_where_the_curve_is_flat():
    from dovetail_rt import ngram

    context = ngram.TokenIndex([t for k in range(6) for t in (7, 8, 100 + k)] + [7, 8])  # 7 8 went on 6 ways
    n, conts = ngram.lookup(context, None, 1, 8, 2)
    for curve, branches in ((FLAT, 6), (STEEP, 3)):
        drafter = ngram.NgramDrafter(ngram.Lookup(), DraftConfig(adaptive=False), {q: t / 1000 for q, t in curve.items()})
        tokens, parents, counts = ngram.trie(conts, drafter.top_k)
        assert parents.count(0) == branches


def test_a_probe_is_sent_only_where_the_drafts_catch_up_costs_little_of_the_idle_steps():
    """A probe makes a model draft catch up over every token it has not run (the prompt, at a generation's
    start): sent once that costs at most PROBE_SHARE of the target's time over the idle steps. A draft
    prefilling 8 ms a token beside a 43 ms step never gets there; one at 0.2 ms a token (a GPU's) probes."""
    from dovetail_rt.cost import PROBE_EVERY, PROBE_SHARE

    q4 = {1: 0.043, 2: 0.078, 3: 0.103, 4: 0.132, 6: 0.148, 8: 0.279, 16: 0.378}
    for per_token, probes in ((0.008, False), (0.0002, True)):
        cost = CostModel(q4)
        cost.observe(4, 0, [0.9, 0.8, 0.7, 0.6], 0.132, 150 * per_token + 5 * 0.001, catch_up=(150 * per_token, 150))
        for _ in range(9):  # the draft (1 ms a token: not hopeless) is always wrong: drafting goes off
            cost.observe(4, 0, [0.9, 0.8, 0.7, 0.6], 0.132, 5 * 0.001)
        assert cost.t_catch == pytest.approx(per_token)
        sent = []
        for step in range(300):  # a new generation: 150 prompt tokens the draft has not run, then one a step
            if cost.worth_drafting(8, behind=150 + step):
                sent.append(step)
                break
            cost.observe(0, 0, [], 0.043, 0.0)
        assert bool(sent) is probes
        if probes:  # the first step past PROBE_EVERY where the catch-up fits in the share
            assert sent[0] >= PROBE_EVERY and (150 + sent[0]) * per_token <= PROBE_SHARE * cost.idle_steps * 0.043

"""The n-gram lookup draft's parts: the matcher, the trie, the suffix index's cap, the chooser's routing."""

import pytest

from dovetail_rt import ngram
from dovetail_rt.config import DraftConfig
from dovetail_rt.draft_kinds import kind_of, make_drafter, model_part, open_draft
from dovetail_rt.drafter import Choice, Chooser, Feedback, NoDraft


def test_longest_match_wins():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    ctx = ngram.TokenIndex([5, 1, 2, 8, 9, 1, 2, 3, 4, 6, 2, 3])
    n, conts = ngram.lookup(ctx, None, 1, 8, 3)
    # the tail "2 3" occurs once before (at 6..7); "3" alone would also match, but the longer match wins
    assert (n, conts) == (2, [[4, 6, 2]])
    # "1 2" occurs twice; "9 1 2" once: only the 3-token match's continuation is proposed
    ctx = ngram.TokenIndex([9, 1, 2, 7, 4, 1, 2, 5, 9, 1, 2])
    assert ngram.lookup(ctx, None, 1, 8, 2) == (3, [[7, 4]])


def test_ties_are_ranked_by_count_then_recency():
    # after "1 2": 7 twice, 5 once (the most recent); the trie puts 7 first, 5 second
    ctx = ngram.TokenIndex([1, 2, 7, 0, 1, 2, 7, 0, 1, 2, 5, 0, 1, 2])
    n, conts = ngram.lookup(ctx, None, 1, 2, 1)
    assert n == 2 and conts == [[5], [7], [7]]  # most recent first
    tokens, parents, counts = ngram.trie(conts, top_k=3)
    assert (tokens, parents, counts) == ([7, 5], [0, 0], [2, 1])
    assert ngram.trie(conts, top_k=1) == ([7], [0], [2])  # a chain follows the most frequent branch
    # equal counts: the more recent continuation first
    assert ngram.trie([[4], [3]], 2)[0] == [4, 3]


def test_no_proposal_past_the_end_of_the_context():
    ctx = ngram.TokenIndex([3, 4, 5, 3, 4])
    n, conts = ngram.lookup(ctx, None, 1, 8, 10)
    assert (n, conts) == (2, [[5, 3, 4]])  # stops where the context stops
    assert ngram.lookup(ngram.TokenIndex([1, 2, 3, 4]), None, 1, 8, 4) == (0, [])  # nothing repeats
    # the context's own tail is never its own match, however long
    assert ngram.lookup(ngram.TokenIndex([7, 7]), None, 2, 8, 4) == (0, [])


def test_the_suffix_index_is_searched_and_its_size_cap_holds():
    index = ngram.SuffixIndex(max_tokens=100)
    index.add([11, 12, 13, 14, 15])
    index.add([16, 17])
    ctx = ngram.TokenIndex([1, 2, 11, 12])
    assert ngram.lookup(ctx, index, 1, 8, 10) == (2, [[13, 14, 15]])  # stops at that output's end
    assert ngram.lookup(ngram.TokenIndex([15]), index, 1, 8, 3) == (0, [])  # nothing follows an output's end
    for i in range(50):
        index.add(list(range(200 + i, 230 + i)))
        kept = index.outputs()
        assert index.n_tokens <= 100 and index.n_tokens == sum(map(len, kept))
        assert kept[-1] == list(range(200 + i, 230 + i))
    assert ngram.lookup(ctx, index, 1, 8, 3) == (0, [])  # what it knew came from an evicted output
    assert len(index.index) <= 2 * (100 + len(index.outputs()) + 30), "evicted outputs were never dropped"
    assert ngram.lookup(ngram.TokenIndex([5, 247, 248]), index, 1, 8, 3) == (2, [[249, 250, 251]])
    index.add(list(range(1000, 1300)))  # longer than the cap: its end is kept
    assert index.n_tokens == 100 and index.outputs() == [list(range(1200, 1300))]


def test_a_drafter_adds_each_generation_to_the_shared_index():
    source = ngram.Lookup(ngram.SuffixIndex(1000))
    drafter = ngram.NgramDrafter(source, DraftConfig(adaptive=False))
    drafter.propose([1, 2, 3], 10)  # prompt [1, 2], first token 3
    drafter.propose([1, 2, 3, 40, 41, 42, 43], 10)
    drafter.finish([1, 2, 3, 40, 41, 42, 43, 44, 45])  # the last accepted batch too
    drafter.reset()  # the next generation: nothing more to add
    assert source.index.outputs() == [[3, 40, 41, 42, 43, 44, 45]]  # the output, not the prompt
    other = ngram.NgramDrafter(source, DraftConfig(adaptive=False))  # another Client sharing the Lookup
    draft = other.propose([9, 8, 40, 41], 10)
    assert draft.tokens == [42, 43, 44, 45] and draft.kind == "ngram"


def test_draft_specs():
    assert model_part("ngram") is None and model_part("ngram+qwen") == "qwen" and model_part("ngramx") == "ngramx"
    lookup, tok = open_draft("ngram", home=None)
    assert isinstance(lookup, ngram.Lookup) and tok is None
    assert isinstance(make_drafter(lookup, DraftConfig()), ngram.NgramDrafter)
    for bad in ("ngram+ngram", "ngram+"):
        with pytest.raises(ValueError, match="after 'ngram\\+'"):
            open_draft(bad, home=None)
    assert [kind_of(s, None).name for s in ("ngram", "ngram+qwen", "ngramx", "qwen2.5-coder-0.5b")] == [
        "ngram", "ngram+", "lm", "lm"]
    with pytest.raises(TypeError, match="not a draft"):
        make_drafter(object(), DraftConfig())  # an object no kind owns: said, not guessed


def test_the_chooser_drafts_with_the_lookup_when_it_has_a_proposal():
    chooser = Chooser(ngram.NgramDrafter(ngram.Lookup(), DraftConfig(adaptive=False)), NoDraft())
    chooser.reset()
    assert len(chooser.propose([1, 2, 3, 4], 8)) == 0 and chooser.used is chooser.model  # nothing repeats
    chooser.observe(Feedback(None, 0, 0, 0.01, 0.0))
    draft = chooser.propose([1, 2, 3, 4, 1, 2], 8)
    assert draft.kind == "ngram" and draft.tokens[:2] == [3, 4] and chooser.used is chooser.lookup
    assert isinstance(make_drafter(Choice(ngram.Lookup(), None), DraftConfig()), Chooser)


def test_walk_finds_the_accepted_path_and_its_leaves():
    from dovetail_rt import tree

    #                     node: 1   2   3   4   5
    t = tree.DraftTree([10, 11, 20, 12, 21], [0, 1, 0, 2, 3], [0.0] * 5)
    assert tree.walk(t, []) == 0 and not tree.is_leaf(t, 0)
    assert tree.walk(t, [10, 11, 12]) == 4 and tree.is_leaf(t, 4)
    assert tree.walk(t, [20]) == 3 and not tree.is_leaf(t, 3)
    assert tree.walk(t, [20, 21]) == 5 and tree.is_leaf(t, 5)
    assert tree.walk(t, [10, 12]) == -1


def test_a_short_branch_accepted_whole_is_a_hit_for_the_run_length():
    """The run length learns from the path: a tree whose short branch was accepted to its leaf was not
    stopped by the target (no miss), while stopping inside the longer branch is one."""
    from dovetail_rt.tree import DraftTree

    t = DraftTree([10, 11, 12, 20], [0, 1, 2, 0], [0.0] * 4, "ngram")  # a 3-deep branch and a 1-deep one
    for path, miss in (([20], 0), ([10], 1), ([10, 11, 12], 0), ([], 0)):
        drafter = ngram.NgramDrafter(ngram.Lookup(), DraftConfig())
        run = drafter.runs[2]
        before = (run.first_hits, run.first_tries, run.hits, run.misses)
        drafter.last = (2, t)
        drafter.observe(Feedback(None, len(t), len(path), 0.01, 0.0, 0, tuple(path)))
        d = ngram.DECAY
        assert run.first_tries == pytest.approx(d * before[1] + 1)
        assert run.first_hits == pytest.approx(d * before[0] + bool(path))
        if path:  # a rejected first token says nothing of the run after it
            assert run.hits == pytest.approx(d * before[2] + len(path) - 1)
            assert run.misses == pytest.approx(d * before[3] + miss)
        else:
            assert (run.hits, run.misses) == before[2:]


def test_a_node_deeper_in_a_run_is_priced_first_then_rate_per_token():
    run = ngram.RunLength.prior(0.5, 0.9)
    assert run.chance(1) == pytest.approx(0.5) and run.chance(3) == pytest.approx(0.5 * 0.81)
    for _ in range(30):  # the match is always right and runs on: both estimates climb
        run.observe(True, 8, whole=True)
    assert run.first > 0.95 and run.rate > 0.95


def test_a_copy_resumes_after_a_renamed_token():
    """The output copies the prompt, then renames one token: no n-gram of the new tail occurred, but the
    tokens before it did, so the draft goes on with what followed the old name (and not with the tail itself)."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    out = [1, 2, 3, 4, 99]  # 5 renamed to 99
    context = ngram.TokenIndex(prompt + [50] + out)
    assert ngram.lookup(context, None, 1, 8, 4) == (0, [])
    n, conts = ngram.resume(context, None, 8, 4)
    assert n == 4 and conts == [[6, 7, 8, 9], [5, 6, 7, 8]]  # the rename first, then an insertion
    drafter = ngram.NgramDrafter(ngram.Lookup(), DraftConfig(tree_top_k=1))
    draft = drafter.propose(prompt + [50] + out, budget=4)
    assert draft.tokens == [6, 7, 8, 9] and drafter.last[0] == ngram.RESUME
    drafter.resumes = False
    drafter.reset()
    assert len(drafter.propose(prompt + [50] + out, budget=4)) == 0


def test_a_resume_is_tried_only_after_a_copy(monkeypatch):
    """Resuming costs a second lookup: tried on a generation's first step (its prompt may end mid-copy) and
    after a step that matched RESUME_MIN tokens or more, never through text that copies nothing (chat)."""
    tried = []
    real = ngram.resume
    monkeypatch.setattr(ngram, "resume", lambda *a: tried.append(len(a[0])) or real(*a))
    drafter = ngram.NgramDrafter(ngram.Lookup(), DraftConfig(tree_top_k=1))
    chat = list(range(100, 140))  # no token repeats: nothing to copy
    for k in range(20, 41):
        drafter.propose(chat[:k], budget=4)
    assert tried == [20]  # the first step only
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    drafter.reset()
    tried.clear()
    for out in ([50], [50, 1], [50, 1, 2], [50, 1, 2, 3], [50, 1, 2, 3, 4], [50, 1, 2, 3, 4, 99]):
        drafter.propose(prompt + out, budget=4)
    assert tried == [12, 17]  # the first step, then after the rename (the copy had matched 4 tokens)
    assert drafter.last[0] == ngram.RESUME

"""The two-process path over tcp://127.0.0.1 gives exactly the target's own greedy output, on every
engine: on llama.cpp the reference is llama.cpp itself decoding one token at a time from the same file."""

from pathlib import Path

import pytest
import torch

from dovetail_rt import Client, SamplingParams, grammar, lm
from dovetail_rt.config import DraftConfig
from dovetail_rt.lm_torch import open_model as open_torch
from dovetail_rt.reference import speculative_generate

from conftest import (VerifierProcess, constrained_greedy, engine_greedy as target_greedy, noisy_copy, tiny_target,
                      tiny_tokenizer)

PROMPTS = [[5], [5, 7, 9, 11], [40, 2, 2, 2, 2, 2, 60, 61, 3], list(range(1, 30))]
# adaptive=False: fixed rules (p_min), so every case surely drafts; "chain-cost-model" lets the
# timing-driven cost model size the chains (it may draft little on tiny models: equality only).
DRAFTS = {
    "chain-1": DraftConfig(draft_max=1, p_min=0.0, adaptive=False),
    "chain-3": DraftConfig(draft_max=3, p_min=0.0, adaptive=False),
    "chain-6-confidence": DraftConfig(draft_max=6, p_min=0.4, adaptive=False),
    "chain-cost-model": DraftConfig(draft_max=6, p_min=0.4),
    "tree-2x3x6": DraftConfig(tree_top_k=2, tree_depth=3, tree_tokens=6, adaptive=False),
    "tree-3x4x12": DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=12, adaptive=False),
    "tree-cost-model": DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=12),  # cut to the cost model's size
}


@pytest.fixture(scope="module")
def target():
    """The tiny target as a torch module (the tiny_dir folder holds the same seeded weights)."""
    return tiny_target(0, sharpen=30)


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def engine(request, tiny_dir, tmp_path_factory):
    """(verifier process, the same target opened in this process) on each engine."""
    if request.param == "torch":
        proc, model = VerifierProcess(tiny_dir), open_torch("tiny", Path("."), model=tiny_target(0, sharpen=30))
    else:
        pytest.importorskip("llama_cpp")
        from tiny_gguf import write_gguf

        vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
        path = write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
        proc = VerifierProcess(path, "--engine", "llamacpp", "--ctx-size", "512")
        model = lm.open_lm(str(path), Path("."), "llamacpp", threads=1, n_ctx=512)
    yield proc, model
    proc.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", DRAFTS)
def test_greedy_output_equals_target_only(engine, target, name):
    verifier, target_lm = engine
    draft = noisy_copy(target, noise=0.3)
    with Client(verifier=verifier.endpoint, draft=draft, draft_config=DRAFTS[name], timeout_s=30) as client:
        n_accepted = 0
        for prompt in PROMPTS:
            expected = target_greedy(target_lm, prompt, 40)
            out = client.generate(prompt, max_new_tokens=40)
            assert out.token_ids == expected, f"prompt {prompt}"
            assert out.stats.n_generated == 40
            n_accepted += out.stats.n_accepted
    if name != "chain-cost-model":
        assert n_accepted > 0, "the draft never agreed: the test would not exercise acceptance"


@pytest.mark.timeout(120)
def test_reference_matches_two_process_path(engine, target):
    """The single-process reference and the fast path agree token for token and step for step."""
    verifier, target_lm = engine
    draft = noisy_copy(target, noise=0.3)
    cfg = DRAFTS["tree-3x4x12"]
    with Client(verifier=verifier.endpoint, draft=draft, draft_config=cfg, timeout_s=30) as client:
        for prompt in PROMPTS[:2]:
            fast = client.generate(prompt, max_new_tokens=30)
            ref = speculative_generate(target_lm, open_torch("draft", Path("."), model=draft), prompt, 30, cfg)
            assert fast.token_ids == ref.token_ids
            assert (fast.stats.n_steps, fast.stats.n_accepted) == (ref.stats.n_steps, ref.stats.n_accepted)


@pytest.mark.timeout(120)
def test_identical_draft_is_fully_accepted(engine, target):
    """Known answer: a draft identical to the target drafting 4-token chains has every token accepted, tau 5."""
    verifier, _ = engine
    with Client(verifier=verifier.endpoint, draft=noisy_copy(target, 0.0),
                draft_config=DraftConfig(draft_max=4, p_min=0.0, adaptive=False), timeout_s=30) as client:
        out = client.generate([3, 4, 5], max_new_tokens=21)
    assert out.stats.n_accepted == out.stats.n_drafted
    assert out.stats.tau == pytest.approx(5.0)


def test_forward_computes_only_the_logits_asked_for(target):
    """A prefill needs the last row's logits, feature extraction none: the rows computed equal the
    same rows of the full forward, and the features are the same."""
    from dovetail_rt.lm_torch import forward

    prompt = list(range(1, 30))
    full, hidden = forward(target, None, prompt, list(range(len(prompt))))
    last, hidden_1 = forward(target, None, prompt, list(range(len(prompt))), logits_for=1)
    none, _ = forward(target, None, prompt, list(range(len(prompt))), logits_for=0)
    assert last.shape == (1, full.shape[1]) and none.shape == (0, full.shape[1])
    torch.testing.assert_close(last, full[-1:])
    torch.testing.assert_close(hidden_1, hidden)


# Lookup drafts: prompts that repeat themselves (the lookup must draft) and ones that do not.
REPEATING = [[40, 2, 2, 2, 2, 2, 60, 61, 3], list(range(1, 30)) * 2, [7, 8, 9, 10, 11, 12] * 4 + [7, 8],
             [1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 5, 9, 1, 2]]  # the last: three continuations, a tree
PLAIN = [[5], [5, 7, 9, 11], [3, 50, 17, 88, 21, 64]]
LOOKUPS = {
    "ngram-chain": ("ngram", DraftConfig(tree_top_k=1, adaptive=False)),
    "ngram-tree": ("ngram", DraftConfig(tree_top_k=3, draft_max=12, adaptive=False)),
    "ngram-cost-model": ("ngram", DraftConfig()),
    "ngram-wide": ("ngram", DraftConfig(tree_top_k=8, draft_max=32, adaptive=False)),  # a flat curve's trees
    "ngram+lm-chain": ("ngram+", DraftConfig(draft_max=3, p_min=0.0, adaptive=False)),
    "ngram+lm-tree": ("ngram+", DraftConfig(tree_top_k=2, tree_depth=3, tree_tokens=6, adaptive=False)),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", LOOKUPS)
def test_lookup_greedy_output_equals_target_only(engine, target, name):
    from dovetail_rt import ngram
    from dovetail_rt.drafter import Choice

    verifier, target_lm = engine
    spec, cfg = LOOKUPS[name]
    draft = ngram.Lookup() if spec == "ngram" else Choice(ngram.Lookup(), noisy_copy(target, noise=0.3))
    by_kind = {}
    with Client(verifier=verifier.endpoint, draft=draft, draft_config=cfg, timeout_s=30) as client:
        for prompt in REPEATING + PLAIN:
            out = client.generate(prompt, max_new_tokens=40)
            assert out.token_ids == target_greedy(target_lm, prompt, 40), f"prompt {prompt}"
            for kind, k in out.stats.by_kind.items():
                by_kind[kind] = by_kind.get(kind, 0) + k.accepted
    if name != "ngram-cost-model":
        assert by_kind.get("ngram", 0) > 0, f"the lookup never had a draft accepted: {by_kind}"
    if name.startswith("ngram+"):
        assert by_kind.get("lm", 0) > 0, f"the model draft never had a draft accepted: {by_kind}"


@pytest.mark.timeout(120)
def test_a_lookup_draft_that_resumes_after_a_renamed_token_is_lossless(engine, target):
    """The prompt ends copying a block, and the target's first token departs from it (an edit): no n-gram of
    the new tail occurred, so the lookup resumes the copy after it (substitution and insertion branches in one
    tree), and the output is still the target's own."""
    from dovetail_rt import ngram

    verifier, target_lm = engine
    for start in range(20, 90, 12):
        block = list(range(start, start + 12))
        prompt = block + [5] + block[:4]
        if target_greedy(target_lm, prompt, 1)[0] not in block:
            break
    for cfg in (DraftConfig(tree_top_k=1, adaptive=False), DraftConfig(tree_top_k=4, draft_max=16, adaptive=False)):
        with Client(verifier=verifier.endpoint, draft=ngram.Lookup(), draft_config=cfg, timeout_s=30) as client:
            out = client.generate(prompt, max_new_tokens=24)
            assert out.token_ids == target_greedy(target_lm, prompt, 24)
            assert client.drafter.runs[ngram.RESUME].first_tries > ngram.PRIOR_STEPS, "the lookup never resumed"


@pytest.mark.timeout(120)
def test_reference_matches_two_process_path_with_lookup(engine, target):
    """The single-process reference with the same lookup draft agrees token for token and step for step."""
    from dovetail_rt import ngram

    verifier, target_lm = engine
    cfg = LOOKUPS["ngram-tree"][1]
    with Client(verifier=verifier.endpoint, draft=ngram.Lookup(), draft_config=cfg, timeout_s=30) as client:
        for prompt in REPEATING[:2]:
            fast = client.generate(prompt, max_new_tokens=30)
            ref = speculative_generate(target_lm, ngram.NgramDrafter(ngram.Lookup(), cfg), prompt, 30, cfg)
            assert fast.token_ids == ref.token_ids
            assert (fast.stats.n_steps, fast.stats.n_accepted) == (ref.stats.n_steps, ref.stats.n_accepted)


# ---- structured output: the same equality under a grammar (issue 20 item 4) -----------------------
WORDS = grammar.compile_grammar("regex", "(w1(w2|w3|w4)w[5-9])+")  # what is allowed depends on the state


GRAMMAR_PROMPTS = [[5, 7, 9], [1, 2, 5, 1, 3, 6, 1, 2, 5, 1, 3], list(range(1, 30))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["chain-3", "tree-3x4x12", "ngram-tree"])
def test_constrained_greedy_output_equals_the_constrained_target(engine, target, name):
    """Greedy under a grammar is exactly the target's own constrained one-token decode, for chains
    and trees of a draft that knows no grammar (most of its tokens are cut) and for a lookup draft
    (which finds the grammar's patterns in the prompt and earlier outputs, and gets accepted)."""
    from dovetail_rt import ngram

    verifier, target_lm = engine
    draft, cfg = ((ngram.Lookup(), DraftConfig(tree_top_k=3, draft_max=12, adaptive=False)) if name == "ngram-tree"
                  else (noisy_copy(target, noise=0.3), DRAFTS[name]))
    with Client(verifier=verifier.endpoint, draft=draft, draft_config=cfg, tokenizer=tiny_tokenizer(),
                timeout_s=30) as client:
        n_drafted = n_accepted = 0
        for prompt in GRAMMAR_PROMPTS:
            out = client.generate(prompt, max_new_tokens=24, grammar=WORDS)
            assert out.token_ids == constrained_greedy(target_lm, prompt, 24, WORDS), f"prompt {prompt}"
            assert out.token_ids[0] == 1 and out.token_ids[1] in (2, 3, 4) and 5 <= out.token_ids[2] <= 9
            n_drafted, n_accepted = n_drafted + out.stats.n_drafted, n_accepted + out.stats.n_accepted
    assert n_drafted > 0
    if name == "ngram-tree":
        assert n_accepted > 0, "the lookup never agreed: the test would not exercise acceptance under the mask"


@pytest.mark.timeout(120)
def test_seeded_sampling_under_a_grammar_is_the_targets_own(engine, target):
    """Seeded sampling under a grammar gives, token for token, what the target alone gives with that
    seed and grammar, whatever the draft proposed."""
    verifier, _ = engine
    with Client(verifier=verifier.endpoint, draft=noisy_copy(target, noise=0.3), draft_config=DRAFTS["tree-2x3x6"],
                timeout_s=30) as spec, Client(verifier=verifier.endpoint, draft=None, timeout_s=30) as alone:
        for seed in range(6):
            args = ([5, 7, 9], 16, SamplingParams(0.9))
            out = spec.generate(*args, seed=seed, grammar=WORDS)
            assert out.token_ids == alone.generate(*args, seed=seed, grammar=WORDS).token_ids
            assert out.token_ids[0] == 1 and out.token_ids[1] in (2, 3, 4)


def test_a_grammar_that_does_not_compile_is_refused_by_name(engine):
    from dovetail_rt.client import VerifierError

    verifier, _ = engine
    with Client(verifier=verifier.endpoint, draft=None, timeout_s=30) as client:
        with pytest.raises(VerifierError, match="bad_grammar|grammar"):
            client.generate([5], 4, grammar="%%% not a grammar")


@pytest.mark.timeout(120)
def test_a_complete_grammar_ends_on_eos_or_lets_the_rest_run(engine, target):
    """Once the grammar is complete: EOS where the target has one (the torch tiny model: id 2), else
    (the tiny GGUF has no EOS) every token is allowed and the generation runs to its limit."""
    verifier, target_lm = engine
    done = grammar.compile_grammar("regex", "w1w3w5")
    with Client(verifier=verifier.endpoint, draft=noisy_copy(target, noise=0.3), draft_config=DRAFTS["chain-3"],
                timeout_s=30) as client:
        out = client.generate([5, 7, 9], 8, grammar=done).token_ids
    assert out[:3] == [1, 3, 5] and out == constrained_greedy(target_lm, [5, 7, 9], len(out), done)
    if target_lm.info.eos:
        assert out == [1, 3, 5, target_lm.info.eos[0]]
    else:
        assert len(out) == 8

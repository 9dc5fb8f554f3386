"""One draft LM shared by threads (the server's draft): forwards of different threads that wait together
run as one engine pass, and each thread gets what its own forward gives alone. Then the whole path: a
real server with a small-LM draft and several requests at once, each equal to the target's greedy output."""

import threading
from pathlib import Path

import pytest
import torch

from dovetail_rt import lm
from dovetail_rt.draft_kinds import open_draft, share
from dovetail_rt.drafter import Choice
from dovetail_rt.lm_shared import SharedLM
from dovetail_rt.lm_torch import open_model as open_torch

from conftest import noisy_copy, save_model, tiny_target, tiny_tokenizer

PROMPTS = [[5, 17, 3, 80], [40, 2, 2, 2, 60], list(range(1, 20)), [81], [13, 14, 15], [7, 7, 7, 7, 7, 7, 7]]
ROUNDS = 8
ATOL = {"torch": 1e-4, "llamacpp": 2e-3}  # llama.cpp's kernels round per batch size (DESIGN.md §7)


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def engine(request, tmp_path_factory):
    if request.param == "torch":
        yield open_torch("tiny", Path("."), model=tiny_target(0, sharpen=30), tokenizer=tiny_tokenizer())
        return
    pytest.importorskip("llama_cpp")
    from tiny_gguf import write_gguf

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    path = write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    opened = lm.open_lm(str(path), Path("."), "llamacpp", threads=1, n_ctx=256, sessions=len(PROMPTS))
    yield opened
    opened.close()


def work(model, prompt: list[int], start: threading.Barrier | None) -> list[torch.Tensor]:
    """What a draft does: a prefill, then rounds of a short chain (one kept) and a small tree (dropped)."""
    s = model.session()
    got = [s.forward(prompt, logits_for=1).logits]
    s.keep(list(range(len(prompt))))
    for r in range(ROUNDS):
        if start:
            start.wait()
        got.append(s.forward([10 + r, 20 + r]).logits)
        s.keep([0])
        got.append(s.forward([30 + r, 31, 32, 33], [-1, 0, 0, 1]).logits)
        s.truncate(s.length)
    s.close()
    return got


def test_threads_share_passes_and_each_gets_its_own_output(engine):
    shared = SharedLM(engine)
    results = [None] * len(PROMPTS)
    start = threading.Barrier(len(PROMPTS))

    def run(i):
        results[i] = work(shared, PROMPTS[i], start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(PROMPTS):
        alone = work(engine, prompt, None)
        for got, want in zip(results[i], alone):
            torch.testing.assert_close(got, want, atol=ATOL[engine.info.engine], rtol=0)
    assert shared.forwards == len(PROMPTS) * (1 + 2 * ROUNDS)
    assert shared.passes < shared.forwards, "no two threads' forwards ever shared a pass"


def test_a_refused_forward_fails_its_own_thread_only(engine):
    """A refused forward and a good one IN THE SAME PASS: only the refused one's thread gets the error."""
    shared = SharedLM(engine, gather_s=30.0)
    shared.last_batch = 2  # as after a pass of both: the leader waits for the other forward (at most gather_s)
    good, bad = shared.session(), shared.session()
    errors, outs = [], []
    start = threading.Barrier(2)

    def run_bad():
        start.wait()
        try:
            bad.forward([1, 2], [-1, 5])  # parent 5 does not exist
        except ValueError as exc:
            errors.append(exc)

    def run_good():
        start.wait()
        outs.append(good.forward([3, 4]).logits)

    threads = [threading.Thread(target=run_bad), threading.Thread(target=run_good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (shared.passes, shared.forwards) == (1, 2), "the two forwards did not share a pass"
    assert len(errors) == 1 and "parent" in str(errors[0])
    assert bad.length == 0 and len(outs) == 1
    plain = engine.session()
    torch.testing.assert_close(outs[0], plain.forward([3, 4]).logits, atol=ATOL[engine.info.engine], rtol=0)
    for s in (good, bad, plain):
        s.close()


def test_share_wraps_a_batching_model_draft_and_leaves_other_kinds(tmp_path):
    draft_dir = save_model(noisy_copy(tiny_target(0, sharpen=30), noise=0.3), tiny_tokenizer(), tmp_path / "draft")
    model, _ = open_draft(str(draft_dir), Path("."), dtype="float32")
    assert isinstance(share(model), SharedLM)
    lookup, _ = open_draft("ngram", Path("."))
    assert share(lookup) is lookup
    choice = share(Choice(lookup, model))
    assert choice.lookup is lookup and isinstance(choice.model, SharedLM)

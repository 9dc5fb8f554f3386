"""The model seam's contract, run on every engine: tiny float32 models (the torch engine's Llama and
the same weights written as a GGUF for llama.cpp), so each engine is checked against itself and
the llama.cpp engine against the torch reference."""

from pathlib import Path

import pytest
import torch

from dovetail_rt import lm
from dovetail_rt.lm_torch import open_model as open_torch

from conftest import tiny_target, tiny_tokenizer

ATOL = 2e-3  # llama.cpp's kernels round differently per batch size: close, not bitwise (DESIGN.md §7)
PROMPT = [5, 17, 3, 80, 41, 9, 66, 12]


@pytest.fixture(scope="module")
def torch_lm():
    return open_torch("tiny", Path("."), model=tiny_target(0, sharpen=30), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    from tiny_gguf import write_gguf

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    return write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def model(request, torch_lm):
    if request.param == "torch":
        yield torch_lm
        return
    pytest.importorskip("llama_cpp")
    path = request.getfixturevalue("gguf_path")
    opened = lm.open_lm(str(path), Path("."), "llamacpp", threads=1, n_ctx=512, max_tree=32)
    yield opened
    opened.close()


def prefill(model, tokens, features=False):
    s = model.session(features=features)
    s.forward(tokens, logits_for=0)
    s.keep(list(range(len(tokens))))
    return s


def chain_logits(model, tokens) -> torch.Tensor:
    """Logits after each token of a fresh chain forward (the reference every check compares to)."""
    s = model.session()
    out = s.forward(tokens).logits
    s.close()
    return out


TREE_TOKENS = [30, 31, 32, 33, 34, 35, 36]
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 5]  # root, two children, grandchildren, a depth-3 node


def path_to(node, parents):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_tree_forward_equals_chain_forward_of_each_path(model):
    s = prefill(model, PROMPT)
    tree = s.forward(TREE_TOKENS, TREE_PARENTS).logits
    for node in range(len(TREE_TOKENS)):
        path = [TREE_TOKENS[i] for i in path_to(node, TREE_PARENTS)]
        expected = chain_logits(model, PROMPT + path)[-1]
        torch.testing.assert_close(tree[node], expected, atol=ATOL, rtol=0)
    s.close()


def test_tree_grown_over_several_forwards_equals_one_pass(model):
    """A draft grows its tree a level per forward; parents may point at an earlier forward's node."""
    s = prefill(model, PROMPT)
    first = s.forward(TREE_TOKENS[:3], TREE_PARENTS[:3]).logits
    second = s.forward(TREE_TOKENS[3:], TREE_PARENTS[3:]).logits
    s.close()
    one = prefill(model, PROMPT)
    whole = one.forward(TREE_TOKENS, TREE_PARENTS).logits
    one.close()
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=ATOL, rtol=0)


@pytest.mark.parametrize("accepted", [[0], [0, 2, 5, 6], [0, 1, 4]])
def test_keep_then_next_forward_equals_fresh_prefill(model, accepted):
    s = prefill(model, PROMPT)
    s.forward(TREE_TOKENS, TREE_PARENTS)
    s.keep(accepted)
    committed = PROMPT + [TREE_TOKENS[i] for i in accepted]
    assert s.length == len(committed)
    nxt = s.forward([7, 8]).logits
    s.close()
    torch.testing.assert_close(nxt, chain_logits(model, committed + [7, 8])[-2:], atol=ATOL, rtol=0)


def test_truncate_forgets_dropped_tokens(model):
    s = prefill(model, PROMPT)
    s.forward([50, 51, 52])
    s.keep([0, 1, 2])
    s.forward([60, 61], [-1, -1])  # pending siblings, dropped too
    s.truncate(len(PROMPT) - 2)
    assert s.length == len(PROMPT) - 2
    out = s.forward([90, 91]).logits
    s.close()
    torch.testing.assert_close(out, chain_logits(model, PROMPT[:-2] + [90, 91])[-2:], atol=ATOL, rtol=0)


def test_chain_then_branch_then_keep(model):
    """A pending chain (linear) that later branches, as a chain draft followed by a sibling."""
    s = prefill(model, PROMPT)
    s.forward([40])
    s.forward([41])  # continues the chain: pending 0 -> 1
    s.forward([42], [0])  # a sibling of 41 below 40: the pending nodes branch
    s.keep([0, 2])
    out = s.forward([43]).logits
    s.close()
    torch.testing.assert_close(out[0], chain_logits(model, PROMPT + [40, 42, 43])[-1], atol=ATOL, rtol=0)


def test_keep_refuses_a_set_that_is_not_a_path(model):
    s = prefill(model, PROMPT)
    s.forward(TREE_TOKENS, TREE_PARENTS)
    with pytest.raises(ValueError, match="root-to-node"):
        s.keep([0, 3])  # 3 is a child of 1, not of 0
    with pytest.raises(ValueError, match="parent"):
        s.forward([1], [99])
    s.close()


def test_logits_for_picks_the_last_rows(model):
    s = model.session()
    last = s.forward(PROMPT, logits_for=2).logits
    s.close()
    assert last.shape == (2, model.info.vocab_size)
    torch.testing.assert_close(last, chain_logits(model, PROMPT)[-2:], atol=ATOL, rtol=0)


def test_features_are_the_same_in_a_tree_and_a_chain(model):
    s = prefill(model, PROMPT, features=True)
    tree = s.forward(TREE_TOKENS, TREE_PARENTS).features
    s.close()
    assert tree.shape == (len(TREE_TOKENS), model.info.hidden_size)
    c = model.session(features=True)
    chain = c.forward(PROMPT + [TREE_TOKENS[i] for i in path_to(6, TREE_PARENTS)]).features
    c.close()
    torch.testing.assert_close(tree[6], chain[-1], atol=ATOL, rtol=0)


def test_engines_agree_with_the_torch_reference(model, torch_lm):
    """The same weights give the same logits and features on every engine (float32 files)."""
    ours = model.session(features=True).forward(PROMPT)
    ref = torch_lm.session(features=True).forward(PROMPT)
    torch.testing.assert_close(ours.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.features.float(), ref.features.float(), atol=ATOL, rtol=0)


def test_info_carries_the_handshake_facts(model):
    from dovetail_rt.store import vocab_strings

    info = model.info
    assert info.vocab == vocab_strings(tiny_tokenizer())  # the strings the draft side sends in HELLO
    assert (info.vocab_size, info.hidden_size) == (99, 32)
    assert info.trees and info.features and info.engine in lm.ENGINES


def test_flash_attention_is_llamacpps_numerics_within_its_float16_sums(gguf_path, model, torch_lm):
    """`--flash-attn on` reaches the context: a tree forward still works, and its logits are the plain
    path's within flash attention's float16 sums of V (DESIGN.md section 7; not bitwise, hence off by default)."""
    if model is torch_lm:
        pytest.skip("a llama.cpp setting")
    flash = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=1, n_ctx=512, max_tree=32, flash_attn=True)
    try:
        s, ref = prefill(flash, PROMPT), prefill(model, PROMPT)
        tree, parents = [3, 4, 5, 6], [-1, 0, 0, 1]
        ours, plain = s.forward(tree, parents), ref.forward(tree, parents)
        torch.testing.assert_close(ours.logits, plain.logits, atol=2e-2, rtol=0)
    finally:
        flash.close()


@pytest.mark.parametrize("fmt", ["q8_0", "bf16"])
def test_requantized_file_opens_with_its_format(gguf_path, tmp_path, fmt):
    """`models install --format` writes other formats with llama.cpp's quantizer; the engine names them."""
    pytest.importorskip("llama_cpp")
    from dovetail_rt.lm_llamacpp import requantize, weight_format

    out = tmp_path / f"tiny.{fmt}.gguf"
    requantize(gguf_path, out, fmt, threads=1)
    assert weight_format(out) == fmt.upper()
    opened = lm.open_lm(str(out), Path("."), "llamacpp", threads=1, n_ctx=256)
    assert opened.info.weight_format == fmt.upper()
    logits = opened.session().forward(PROMPT).logits
    assert torch.isfinite(logits).all() and logits.shape == (len(PROMPT), 99)
    opened.close()


# ---- several sessions in one pass (the verifier batches sessions' VERIFY requests) ----------------
def batch_items(model):
    """Three sessions at different lengths, each with its own kind of forward: a one-token step,
    a chain draft, a tree draft."""
    a, b, c = prefill(model, PROMPT), prefill(model, PROMPT[:5]), prefill(model, PROMPT[::-1])
    return [(a, [7], None, None), (b, [40, 41, 42], None, None), (c, TREE_TOKENS, TREE_PARENTS, None)]


def test_batch_of_sessions_equals_each_session_alone(model):
    items = batch_items(model)
    together = model.forward_batch(items)
    for s, *_ in items:
        s.close()
    alone = []
    for s, tokens, parents, rows in batch_items(model):
        alone.append(s.forward(tokens, parents, rows))
        s.close()
    for got, want in zip(together, alone):
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)


def test_sessions_of_one_pass_keep_their_own_paths(model):
    """After a batched pass and each session's keep, every session continues from its own tokens only."""
    items = batch_items(model)
    model.forward_batch(items)
    (a, *_), (b, *_), (c, *_) = items
    a.keep([0]), b.keep([0, 1]), c.keep([0, 2, 5, 6])
    committed = [PROMPT + [7], PROMPT[:5] + [40, 41], PROMPT[::-1] + [TREE_TOKENS[i] for i in (0, 2, 5, 6)]]
    nxt = model.forward_batch([(s, [9, 10], None, None) for s in (a, b, c)])
    for s, out, tokens in zip((a, b, c), nxt, committed):
        torch.testing.assert_close(out.logits, chain_logits(model, tokens + [9, 10])[-2:], atol=ATOL, rtol=0)
        s.close()


def test_a_refused_item_does_not_stop_the_others(model):
    a, b = prefill(model, PROMPT), prefill(model, PROMPT[:4])
    bad, good = model.forward_batch([(a, [1, 2], [-1, 7], None), (b, [3], None, None)])
    assert isinstance(bad, ValueError) and "parent" in str(bad)
    torch.testing.assert_close(good.logits, chain_logits(model, PROMPT[:4] + [3])[-1:], atol=ATOL, rtol=0)
    assert a.length == len(PROMPT)
    out = a.forward([1]).logits  # the refused session is as it was
    torch.testing.assert_close(out, chain_logits(model, PROMPT + [1])[-1:], atol=ATOL, rtol=0)
    a.close(), b.close()


def test_batch_leaves_for_a_later_pass_what_does_not_fit(gguf_path):
    pytest.importorskip("llama_cpp")
    small = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=1, n_ctx=256, n_batch=8)
    a, b = prefill(small, PROMPT), prefill(small, PROMPT)
    first, second = small.forward_batch([(a, [1, 2, 3, 4, 5], None, None), (b, [6, 7, 8, 9], None, None)])
    assert first is not None and second is None  # 5 + 4 rows > a batch of 8: b waits, untouched
    a.keep([0])
    (second,) = small.forward_batch([(b, [6, 7, 8, 9], None, None)])
    torch.testing.assert_close(second.logits, chain_logits(small, PROMPT + [6, 7, 8, 9])[-4:], atol=ATOL, rtol=0)
    a.close(), b.close()
    small.close()


def test_a_full_kv_pool_is_refused_and_loses_nothing(gguf_path):
    """Sessions share the KV budget: past it a forward raises CacheFull and the session is as it was."""
    pytest.importorskip("llama_cpp")
    small = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=1, n_ctx=256, n_batch=256)
    cells = small.kv_cells
    a = prefill(small, [5] * (cells - 20))
    b = prefill(small, PROMPT)
    with pytest.raises(lm.CacheFull, match="full"):
        b.forward([1] * 30)
    assert b.length == len(PROMPT)
    a.close()  # frees its cells: b goes on
    torch.testing.assert_close(b.forward([1] * 30).logits[-1], chain_logits(small, PROMPT + [1] * 30)[-1], atol=ATOL, rtol=0)
    b.close()
    small.close()


def test_a_nearly_full_pool_runs_what_fits_and_defers_the_rest(gguf_path):
    """Two sessions in one batch that do not fit the pool together: the first runs alone, the second
    is left for a later pass (None), untouched, instead of both being refused."""
    pytest.importorskip("llama_cpp")
    small = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=1, n_ctx=256, n_batch=256)
    expected = chain_logits(small, PROMPT[:5] + [1] * 20)[-1]
    filler = prefill(small, [5] * (small.kv_cells - 40))
    a, b = prefill(small, PROMPT[:5]), prefill(small, PROMPT[:5])
    first, second = small.forward_batch([(a, [1] * 20, None, None), (b, [2] * 20, None, None)])
    assert isinstance(first, lm.Output) and second is None
    torch.testing.assert_close(first.logits[-1], expected, atol=ATOL, rtol=0)
    assert b.length == 5 and not b.pending
    for s in (filler, a, b):
        s.close()
    small.close()


def test_write_format_writes_a_format_once_beside_the_installed_gguf(gguf_path, tmp_path):
    """`models install --format`'s writer: the file lands where NAME:FORMAT resolves, once."""
    pytest.importorskip("llama_cpp")
    import shutil

    from dovetail_rt import store
    from dovetail_rt.lm_llamacpp import weight_format, write_format

    (tmp_path / "gguf").mkdir()
    shutil.copy(gguf_path, tmp_path / "gguf" / "tiny.gguf")
    path, written = write_format(tmp_path, "tiny", "q8_0")
    assert written and path == store.format_path(tmp_path, "tiny", "q8_0") and weight_format(path) == "Q8_0"
    assert write_format(tmp_path, "tiny", "q8_0") == (path, False)
    with pytest.raises(ValueError, match="unknown format"):
        write_format(tmp_path, "tiny", "q3_k")
    with pytest.raises(store.ModelNotFound, match="models install other"):
        write_format(tmp_path, "other", "q8_0")

"""Streaming detokenization: pushed in any batch sizes, the pieces add up to the whole decode."""

import pytest

from dovetail_rt.detok import IncrementalDetokenizer

from conftest import tiny_tokenizer


def pieces(tokenizer, ids, step):
    d = IncrementalDetokenizer(tokenizer)
    out = [d.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return out + [d.flush()]


@pytest.mark.parametrize("step", [1, 2, 5, 40])
def test_word_level_pieces_keep_their_spaces(step):
    tok = tiny_tokenizer()
    ids = list(range(1, 99)) * 2
    assert "".join(pieces(tok, ids, step)) == tok.decode(ids)


@pytest.mark.real_model
@pytest.mark.parametrize("step", [1, 3])
def test_byte_level_pieces_never_split_a_character(step):
    from dovetail_rt import store
    from dovetail_rt.config import dovetail_home

    try:
        tok = store.load_tokenizer(store.DEFAULT_TARGET, dovetail_home())
    except FileNotFoundError:
        pytest.skip("the default target is not installed")
    text = "héllo wörld 日本語 🙂 def f(x):\n    return x * 2\n"
    ids = tok(text, add_special_tokens=False)["input_ids"] * 3
    out = pieces(tok, ids, step)
    assert "".join(out) == tok.decode(ids) and not any("\ufffd" in p for p in out)

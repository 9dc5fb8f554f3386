"""The Dovetail draft head: checkpoints, lossless drafting with it, tree invariants, training."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dovetail_rt import Client, tree
from dovetail_rt.config import DraftConfig
from dovetail_rt.draft_head import DraftHead, HeadConfig, is_head_folder, load_head, save_head, shared_weights

from test_greedy import PROMPTS, target_greedy


def make_head(target_dir, layers=1, fusion="dgf", seed=0):
    torch.manual_seed(seed)
    embed, lm_head = shared_weights(target_dir)
    return DraftHead(AutoConfig.from_pretrained(target_dir), HeadConfig(str(target_dir), layers, fusion), embed, lm_head)


@pytest.fixture(scope="module")
def target(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("fusion", ["dgf", "fc"])
def test_checkpoint_round_trip(tmp_path, tiny_dir, fusion):
    head = make_head(tiny_dir, layers=2, fusion=fusion).eval()
    save_head(head, tmp_path / "head")
    assert is_head_folder(tmp_path / "head") and not is_head_folder(tiny_dir)
    loaded = load_head(tmp_path / "head", home=tmp_path)
    f, x, pos = torch.randn(1, 5, 32), torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(head(f, x, pos), loaded(f, x, pos))
    # only the head's own weights are stored: the embedding and lm_head come from the target
    from safetensors import safe_open
    with safe_open(str(tmp_path / "head" / "model.safetensors"), "pt") as st:
        assert not any(k.startswith(("embed.", "lm_head.")) for k in st.keys())


def test_tree_invariants():
    gen = torch.Generator().manual_seed(0)
    calls = []

    def expand(nodes, tokens, parents, depths):
        calls.append(list(nodes))
        return torch.randn(len(nodes), 50, generator=gen).log_softmax(-1)

    for top_k, depth, total in [(2, 3, 6), (3, 4, 12), (4, 5, 16), (1, 5, 6)]:
        t = tree.grow(torch.randn(50, generator=gen).log_softmax(-1), expand, top_k, depth, total)
        assert len(t) == min(total - 1, sum(top_k ** (d + 1) if d == 0 else top_k * top_k for d in range(depth)))
        assert all(0 <= p < i for i, p in enumerate(t.parents, start=1)), "parents precede children"
        depths = []
        for p in t.parents:
            depths.append(0 if p == 0 else depths[p - 1] + 1)
        assert max(depths) < depth
        for i, p in enumerate(t.parents, start=1):  # a child never scores above its parent
            if p:
                assert t.scores[i - 1] <= t.scores[p - 1]
        kept = sorted(t.scores, reverse=True)
        assert kept[-1] == min(t.scores)  # the best nodes were kept
        siblings = {}
        for i, p in enumerate(t.parents, start=1):
            siblings.setdefault(p, []).append(t.scores[i - 1])
        assert all(s == sorted(s, reverse=True) for s in siblings.values()), "siblings best first"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("draft_config", [DraftConfig(tree_top_k=1, draft_max=4),
                                          DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=10)], ids=["chain", "tree"])
def test_greedy_with_head_equals_target(verifier, target, tiny_dir, draft_config):
    head = make_head(tiny_dir, layers=1).eval()
    with Client(verifier=verifier.endpoint, draft=head, draft_config=draft_config, timeout_s=30) as client:
        for prompt in PROMPTS:
            out = client.generate(prompt, max_new_tokens=30)
            assert out.token_ids == target_greedy(target, prompt, 30)
            assert out.stats.n_drafted > 0

"""The Dovetail draft head: a feature-level draft that reads the target's hidden states.

    e  = RMSNorm(Embed(x_{t+1}))            Embed: the target's own frozen table
    h1 = f W1 ; h2 = SiLU(e W2)             f: the target's last-layer feature at t
    z  = sigmoid([h1 ; h2] Wz)
    g  = z * h1 + (1 - z) * h2              Dynamic Gating Fusion (or EAGLE's fc([e ; f]))
    f^ = DecoderLayer_N(... DecoderLayer_1(g))   layers of the target's family; layer 1 has no input norm
    logits = lm_head(f^)                    the target's own frozen lm_head

A checkpoint is a folder: ``config.json`` (``"architectures": ["DovetailDraftHead"]`` plus the
head settings and the target's config) and ``model.safetensors`` with the head's own weights only;
the embedding table and lm_head are read from the target's checkpoint (two tensors, nothing else).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

HEAD_ARCH = "DovetailDraftHead"


@dataclass(frozen=True)
class HeadConfig:
    target: str  # the target's spec (short name or folder): where embed + lm_head come from
    layers: int = 1
    fusion: str = "dgf"  # dgf | fc

    def __post_init__(self):
        if not 1 <= self.layers <= 6:
            raise ValueError(f"a head has 1..6 decoder layers, got {self.layers}")
        if self.fusion not in ("dgf", "fc"):
            raise ValueError(f"fusion must be dgf or fc, got '{self.fusion}'")


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def trunk_config(target_config, layers: int):
    """The target's config with N layers and a 1-row vocabulary (the trunk never embeds ids)."""
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = layers
    cfg.vocab_size = 1
    cfg.pad_token_id = None
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    cfg.tie_word_embeddings = False
    return cfg


class DraftHead(nn.Module):
    def __init__(self, target_config, config: HeadConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        from transformers import AutoModel

        super().__init__()
        d = target_config.hidden_size
        self.config, self.target_config = config, target_config
        self.embed = nn.Embedding.from_pretrained(embed_weight, freeze=True)
        self.lm_head = nn.Linear(d, lm_head_weight.shape[0], bias=False)
        self.lm_head.weight = nn.Parameter(lm_head_weight, requires_grad=False)
        self.embed_norm = RMSNorm(d, getattr(target_config, "rms_norm_eps", 1e-6))
        if config.fusion == "dgf":
            self.w1 = nn.Linear(d, d, bias=False)
            self.w2 = nn.Linear(d, d, bias=False)
            self.wz = nn.Linear(2 * d, d, bias=False)
        else:
            self.fc = nn.Linear(2 * d, d, bias=False)
        self.trunk = AutoModel.from_config(trunk_config(target_config, config.layers), attn_implementation="sdpa")
        self.trunk.layers[0].input_layernorm = nn.Identity()  # the fused input is not normed again

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Draft only over these token ids (the corpus' most frequent first): on a CPU the lm_head
        dominates a head's step, and most of a 150k vocabulary is never drafted. Lossless: the
        target still verifies every token; a token outside the set is just never proposed."""
        self.register_buffer("draft_vocab", ids.long().to(self.lm_head.weight.device))
        # its lm_head rows, built once (not saved: they come from the target like the lm_head)
        rows = self.lm_head.weight.detach()[self.draft_vocab].contiguous()
        self.register_buffer("draft_lm_head", rows, persistent=False)

    def draft_logprobs(self, fhat: torch.Tensor) -> torch.Tensor:
        """[n, d] predicted features -> [n, vocab] float32 log-probs; -inf outside the drafting vocabulary."""
        if getattr(self, "draft_vocab", None) is None:
            return self.lm_head(fhat).float().log_softmax(-1)
        sub = (fhat @ self.draft_lm_head.T).float().log_softmax(-1)
        logp = sub.new_full((sub.shape[0], self.lm_head.out_features), float("-inf"))
        logp[:, self.draft_vocab] = sub
        return logp

    def fuse(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f [.., n, d] target (or predicted) features at t, x [.., n] tokens at t + 1 -> g [.., n, d]."""
        e = self.embed_norm(self.embed(x))
        if self.config.fusion == "fc":
            return self.fc(torch.cat([e, f], -1))
        h1, h2 = self.w1(f), nn.functional.silu(self.w2(e))
        z = torch.sigmoid(self.wz(torch.cat([h1, h2], -1)))
        return z * h1 + (1 - z) * h2

    def forward(self, f, x, position_ids, cache=None, attention_mask=None) -> torch.Tensor:
        """Predicted next features f^ [b, n, d] (after the trunk's final norm, like the target's)."""
        g = self.fuse(f.to(self.embed_norm.weight.dtype), x)
        out = self.trunk(inputs_embeds=g, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                         use_cache=cache is not None)
        return out.last_hidden_state

    def new_cache(self):
        """An empty KV cache for the trunk (one entry per (feature, token) pair run)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.trunk.config)

    @staticmethod
    def crop_cache(cache, length: int) -> None:
        """Drop every cache entry past ``length``."""
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed.", "lm_head."))}

    def init_from_target(self, target_state: dict, n_target_layers: int) -> None:
        """Copy the target's last N decoder layers into the trunk (trains much faster)."""
        first = n_target_layers - self.config.layers
        own = self.trunk.state_dict()
        for key in own:
            if key.startswith("layers."):
                idx, rest = key.split(".", 2)[1:]
                src = f"model.layers.{first + int(idx)}.{rest}"
                if src in target_state:
                    own[key] = target_state[src]
            elif key.startswith("norm.") and f"model.{key}" in target_state:
                own[key] = target_state[f"model.{key}"]
        self.trunk.load_state_dict(own)


# ---- checkpoints -----------------------------------------------------------------------------------
def is_head_folder(path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return HEAD_ARCH in json.loads(cfg.read_text()).get("architectures", [])
    except (OSError, ValueError):
        return False


def save_head(head: DraftHead, folder: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.trainable_state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    config = {"architectures": [HEAD_ARCH], "dovetail_head": asdict(head.config),
              "target_config": head.target_config.to_dict(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def target_tensors(target_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a safetensors checkpoint (single file or sharded)."""
    from safetensors import safe_open

    index = target_dir / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {n: "model.safetensors" for n in names}
    out = {}
    for name in names:
        if name not in where:
            continue
        with safe_open(str(target_dir / where[name]), framework="pt") as f:
            if name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def shared_weights(target_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's embedding table and lm_head (the embedding again when tied)."""
    t = target_tensors(target_dir, ["model.embed_tokens.weight", "lm_head.weight"])
    if "model.embed_tokens.weight" not in t:
        raise FileNotFoundError(f"{target_dir} has no model.embed_tokens.weight in safetensors: a head needs "
                                "the target as a safetensors folder (install or convert it first)")
    return t["model.embed_tokens.weight"], t.get("lm_head.weight", t["model.embed_tokens.weight"])


def load_head(folder, home: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DraftHead:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from . import store

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    config = HeadConfig(**raw["dovetail_head"])
    target_cfg = raw["target_config"]
    target_config = AutoConfig.for_model(**target_cfg)
    target_dir, _ = store.resolve(config.target, home)
    embed, lm_head = shared_weights(Path(target_dir))
    head = DraftHead(target_config, config, embed.to(dtype), lm_head.to(dtype))
    state = load_file(str(folder / "model.safetensors"))
    if "draft_vocab" in state:
        head.set_draft_vocab(state["draft_vocab"])  # registers the buffer the state then fills
    missing, unexpected = head.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("embed.", "lm_head."))]
    if bad or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {bad[:3]}, unexpected {unexpected[:3]}")
    return head.to(device=device, dtype=dtype).eval()  # (.to casts floating tensors only: ids stay int64)

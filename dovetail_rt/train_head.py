"""`dovetail train-head`: teacher-forced target features -> a trained Dovetail draft head.

1. extract: run the target over conversations (chat template) and store its last-layer features
   (float16) and token ids in shards under $DOVETAIL_HOME/features/...; resumable by record.
2. train:   L = SmoothL1(f^, f) + 0.1 * CE(softmax(lm_head(f)), lm_head(f^)) with feature noise,
   AdamW (betas 0.9, 0.95), linear warm-up then cosine decay, gradient clipping; held-out top-1 accuracy (does the
   head's token equal the target's?); checkpoints every N steps; resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .lm_torch import cpu_has_bf16
from .draft_head import DraftHead, HeadConfig, save_head, shared_weights, target_tensors

log = logging.getLogger(__name__)


# ---- 1. corpus -----------------------------------------------------------------------------------
def corpus(spec: str):
    """Yield (record_id, messages or text) from 'sharegpt' (its training slice), 'python' (the
    standard library's source, raw text) or a JSONL file."""
    if spec == "python":
        yield from data.python_stdlib_pieces()
        return
    if spec == "sharegpt":
        for i, rec in enumerate(data.sharegpt_records(0, data.SHAREGPT_HELDOUT_START)):
            roles = {"human": "user", "gpt": "assistant"}
            msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in rec.get("conversations", [])
                    if t.get("from") in roles and t.get("value")]
            if len(msgs) >= 2:
                yield f"sharegpt/{i}", msgs
        return
    for i, line in enumerate(Path(spec).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            yield f"{i}", rec["messages"]
        elif "text" in rec:
            yield f"{i}", rec["text"]
        else:
            raise ValueError(f"{spec} line {i + 1}: needs a 'text' or a 'messages' field")


def encode(tokenizer, item, max_len: int) -> list[int]:
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=False)["input_ids"]
    else:
        ids = list(tokenizer.apply_chat_template(item, tokenize=True, return_dict=False))
    return ids[:max_len]


def feature_dir(home: Path, target: str, data_spec: str, dtype: str, max_len: int) -> Path:
    key = hashlib.sha256(f"{target}|{Path(data_spec).resolve() if Path(data_spec).exists() else data_spec}|{dtype}|{max_len}".encode()).hexdigest()[:12]
    return home / "features" / f"{Path(target).name}-{key}"


@torch.inference_mode()
def extract(target, tokenizer, data_spec: str, out: Path, max_tokens: int, max_len: int = 1024,
            shard_tokens: int = 16384) -> dict:
    """Store target features for up to ``max_tokens`` tokens; resumes where a previous run stopped."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"records": 0, "tokens": 0, "shards": []}
    if manifest["tokens"] >= max_tokens:
        return manifest
    buffer, buffered = {}, 0
    bar = tqdm(total=max_tokens, initial=manifest["tokens"], unit="tok", desc="extract features")

    def flush():
        nonlocal buffer, buffered
        if not buffer:
            return
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        save_file(buffer, str(out / name))
        manifest["shards"].append(name)
        manifest_path.write_text(json.dumps(manifest))  # only after the shard is on disk: resumable
        buffer, buffered = {}, 0

    for index, (rid, item) in enumerate(corpus(data_spec)):
        if index < manifest["records"]:
            continue
        ids = encode(tokenizer, item, max_len)
        manifest["records"] = index + 1
        if len(ids) < 4:
            continue
        state = target.session(features=True)  # target: an opened lm.LM, on any engine with features
        hidden = state.forward(ids, logits_for=0).features
        state.close()
        n = len(buffer) // 2
        buffer[f"tokens.{n}"] = torch.tensor(ids, dtype=torch.int32)
        buffer[f"features.{n}"] = hidden.to(torch.float16).contiguous()
        buffered += len(ids)
        manifest["tokens"] += len(ids)
        bar.update(len(ids))
        if buffered >= shard_tokens:
            flush()
        if manifest["tokens"] >= max_tokens:
            break
    flush()
    bar.close()
    return manifest


def load_sequences(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    seqs = []
    for name in manifest["shards"]:
        shard = load_file(str(folder / name))
        for k in range(len(shard) // 2):
            seqs.append((shard[f"tokens.{k}"].long(), shard[f"features.{k}"]))
    return seqs


def frequent_vocab(seqs, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` token ids a head drafts from: the corpus' most frequent first, then unseen ids
    in id order (a BPE vocabulary is ordered by merge rank, which roughly follows frequency)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for tokens, _ in seqs:
        counts += torch.bincount(tokens.long(), minlength=vocab_size)[:vocab_size]
    return torch.sort(-counts, stable=True).indices[: min(size, vocab_size)]


# ---- 2. training -----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 3e-5
    warmup_steps: int = 50
    final_lr_frac: float = 0.1  # cosine decay after the warm-up, down to this share of lr
    grad_clip: float = 0.5
    ce_weight: float = 0.1
    noise: float = 0.2  # input features get (U - 0.5) * noise * their mean |value|
    chunk: int = 512  # tokens per training sequence (longer ones are cut into chunks)
    heldout_frac: float = 0.05
    eval_every: int = 200
    ckpt_every: int = 200
    seed: int = 0
    autocast: bool = True  # bfloat16 autocast (CUDA, or a CPU with AVX-512 BF16 / AMX); master weights stay float32


def _autocast(cfg: TrainConfig, device: str):
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    enabled = cfg.autocast and (kind == "cuda" or cpu_has_bf16())
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


def head_loss(head: DraftHead, tokens: torch.Tensor, feats: torch.Tensor, cfg: TrainConfig, train: bool):
    """(loss, top-1 matches, positions) for one sequence: pairs (f_i, x_{i+1}) -> f_{i+1}.

    With a drafting vocabulary the cross-entropy runs over its lm_head rows only (the target's
    distribution renormalised there): the head never drafts anything else, and the full lm_head
    was ~80 % of a CPU training step. Held-out top-1 (``train=False``) is always scored against the
    target's argmax over the whole vocabulary, so a token the head cannot draft counts as a miss."""
    f_in, x, f_next = feats[:-1].float(), tokens[1:], feats[1:].float()  # [n, d], [n], [n, d]
    if train and cfg.noise:
        f_in = f_in + (torch.rand_like(f_in) - 0.5) * cfg.noise * f_in.abs().mean()
    fhat = head(f_in[None], x[None], torch.arange(len(x), device=x.device)[None])[0]  # [n, d]
    loss_f = torch.nn.functional.smooth_l1_loss(fhat, f_next)
    vocab = getattr(head, "draft_vocab", None)
    rows = head.lm_head.weight if vocab is None else head.draft_lm_head
    logits = fhat @ rows.T
    with torch.no_grad():
        p = (f_next @ rows.T).softmax(-1)
        mine, theirs = logits.argmax(-1), p.argmax(-1)
        if vocab is not None:
            mine = vocab[mine]
            theirs = vocab[theirs] if train else head.lm_head(f_next).argmax(-1)
        hits = (mine == theirs).sum().item()
    loss_ce = -(p * logits.log_softmax(-1)).sum(-1).mean()
    return loss_f + cfg.ce_weight * loss_ce, hits, len(x)


def chunks(seqs, size: int):
    out = []
    for tokens, feats in seqs:
        for start in range(0, len(tokens) - 1, size):
            t, f = tokens[start : start + size + 1], feats[start : start + size + 1]
            if len(t) >= 3:
                out.append((t, f))
    return out


@torch.no_grad()
def evaluate(head, heldout, cfg: TrainConfig, device) -> float:
    head.eval()
    hits = total = 0
    for tokens, feats in heldout:
        with _autocast(cfg, device):
            _, h, n = head_loss(head, tokens.to(device), feats.to(device), cfg, train=False)
        hits, total = hits + h, total + n
    head.train()
    return hits / max(total, 1)


def lr_factor(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a cosine decay to ``cfg.final_lr_frac`` of the peak at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    done = (step - cfg.warmup_steps) / max(steps - cfg.warmup_steps, 1)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def train(head: DraftHead, seqs, out: Path, cfg: TrainConfig, device: str = "cpu", extra_meta: dict | None = None) -> dict:
    """Train in place; checkpoints (and the trainer state) go to ``out``; resumes from it."""
    rng = random.Random(cfg.seed)
    pieces = chunks(seqs, cfg.chunk)
    rng.shuffle(pieces)
    n_held = max(1, int(len(pieces) * cfg.heldout_frac))
    heldout, train_set = pieces[:n_held], pieces[n_held:]
    steps = max(1, int(len(train_set) * cfg.epochs))
    head.to(device).train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))
    state_path, start = out / "trainer_state.pt", 0
    history = []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)  # our own file, written below
        head.load_state_dict(state["head"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, history = state["step"], state["history"]
        log.info("resuming at step %d", start)
    meta = {"train_config": asdict(cfg), "train_sequences": len(train_set), "heldout_sequences": n_held,
            "train_tokens_per_epoch": sum(len(t) - 1 for t, _ in train_set), **(extra_meta or {})}
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train head", unit="seq")
    run_loss = run_hits = run_n = 0.0
    for step in bar:
        tokens, feats = train_set[step % len(train_set)]
        with _autocast(cfg, device):
            loss, hits, n = head_loss(head, tokens.to(device), feats.to(device), cfg, train=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        run_loss, run_hits, run_n = 0.95 * run_loss + 0.05 * loss.item(), run_hits + hits, run_n + n
        last = step + 1 == steps
        if (step + 1) % cfg.eval_every == 0 or last:
            acc = evaluate(head, heldout, cfg, device)
            history.append({"step": step + 1, "loss": run_loss, "heldout_top1": acc, "train_top1": run_hits / max(run_n, 1)})
            bar.set_postfix(loss=f"{run_loss:.3f}", heldout_top1=f"{acc:.3f}")
            run_hits = run_n = 0
        if (step + 1) % cfg.ckpt_every == 0 or last:
            meta.update(history=history, steps=step + 1, wall_s=meta.get("wall_s", 0) + time.time() - t0)
            t0 = time.time()
            save_head(head, out, {"training": meta})
            torch.save({"head": head.trainable_state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "history": history}, state_path)
    return meta


def build_head(target_spec: str, target_dir: Path, layers: int, fusion: str, init_from_target: bool, seed: int = 0):
    from transformers import AutoConfig

    torch.manual_seed(seed)
    target_config = AutoConfig.from_pretrained(target_dir)
    embed, lm_head = shared_weights(target_dir)
    head = DraftHead(target_config, HeadConfig(target_spec, layers, fusion), embed.float(), lm_head.float())
    if init_from_target:
        n = target_config.num_hidden_layers
        names = [f"model.layers.{i}.{k}" for i in range(n - layers, n) for k in _layer_keys(head)] + ["model.norm.weight"]
        head.init_from_target(target_tensors(target_dir, names), n)
    return head


def _layer_keys(head: DraftHead) -> list[str]:
    return sorted({k.split(".", 2)[2] for k in head.trunk.state_dict() if k.startswith("layers.")})



# ---- the whole pipeline (`dovetail train-head`) ------------------------------------------------------
@dataclass(frozen=True)
class HeadJob:
    """One `dovetail train-head` run: extract target features per corpus, then train a head."""

    model: str  # the target spec (its embedding and lm_head are the head's)
    data: list[str]  # corpora: sharegpt, python, FILE.jsonl
    out: Path  # head folder (resumes if present)
    layers: int = 1
    fusion: str = "dgf"
    max_tokens: list[int] = field(default_factory=lambda: [200_000])  # one budget, or one per corpus
    max_len: int = 1024
    draft_vocab: int = 32768
    init_from_target: bool = True
    device: str = "auto"
    extract_dtype: str = "auto"
    command: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if len(self.max_tokens) not in (1, len(self.data)):
            raise ValueError(f"--max-tokens has {len(self.max_tokens)} values for {len(self.data)} --data corpora: "
                             "give one, or one each")


def run(job: HeadJob, home: Path) -> dict:
    """Extract (cached, resumable) and train; returns the summary the CLI prints."""
    from . import lm, store
    from .client import resolve_device
    from .lm_torch import resolve_dtype

    target_dir, _ = store.resolve(job.model, home)
    dtype = resolve_dtype(job.extract_dtype)
    budgets = job.max_tokens * len(job.data) if len(job.max_tokens) == 1 else job.max_tokens
    target = lm.open_lm(job.model, home, "torch", dtype=job.extract_dtype)
    seqs, feature_tokens = [], 0
    for spec, budget in zip(job.data, budgets):  # each corpus has its own feature cache
        feats = feature_dir(home, job.model, spec, str(dtype), job.max_len)
        manifest = extract(target, target.tokenizer, spec, feats, budget, job.max_len)
        log.info("features: %d tokens from %d %s records in %s", manifest["tokens"], manifest["records"], spec, feats)
        seqs += load_sequences(feats)
        feature_tokens += manifest["tokens"]
    del target
    head = build_head(job.model, Path(target_dir), job.layers, job.fusion, job.init_from_target)
    if job.draft_vocab:
        head.set_draft_vocab(frequent_vocab(seqs, job.draft_vocab, head.lm_head.out_features))
    meta = train(head, seqs, job.out, job.train, resolve_device(job.device),
                 {"target": job.model, "data": ",".join(job.data), "feature_tokens": feature_tokens,
                  "extract_dtype": str(dtype), "init_from_target": job.init_from_target, "command": job.command})
    last = meta["history"][-1]
    return {"out": str(job.out), "steps": meta["steps"], "train_tokens_per_epoch": meta["train_tokens_per_epoch"],
            "heldout_top1": last["heldout_top1"], "loss": last["loss"], "wall_s": round(meta["wall_s"], 1),
            "torch_threads": torch.get_num_threads()}

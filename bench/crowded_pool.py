"""What other sessions' cells in the shared KV pool cost one session's step (issue 18 item 6), with
llama.cpp's flash attention off (the default) and on.

    python bench/crowded_pool.py [--model qwen2.5-coder-1.5b] [--others 5] [--rounds 3]

Two verifier children on the same GGUF file (``--flash-attn off`` / ``on``), interleaved: one session
decodes 128 tokens after a 300-token prompt alone, then while ``--others`` sessions each hold a
500-token prompt and 64 generated tokens in the pool, then alone again. Prints ms per decoded token
(wall clock at the client: forward, link and client) and whether the crowded output equals the lone one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dovetail_rt import store  # noqa: E402
from dovetail_rt.client import Client  # noqa: E402
from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, VerifierConfig, dovetail_home  # noqa: E402
from dovetail_rt.launcher import VerifierChild  # noqa: E402


def ms_per_token(client: Client, ids: list[int], n: int) -> tuple[float, list[int]]:
    out = client.generate(ids, n)
    st = out.stats
    return (st.seconds - st.ttft_s) / (len(out.token_ids) - 1) * 1e3, out.token_ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_TARGET)
    ap.add_argument("--others", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    home = dovetail_home()
    tok = store.load_tokenizer(args.model, home)
    root = Path(__file__).resolve().parents[1] / "dovetail_rt"
    text = (root / "verifier.py").read_text() + (root / "server.py").read_text() + (root / "client.py").read_text()
    ids = tok(text[:4000])["input_ids"][:300]
    others = [tok(text[4000 * (j + 1): 4000 * (j + 2) + 2000])["input_ids"][:500] for j in range(args.others)]
    setups = {}
    for flash in (False, True):
        child = VerifierChild(VerifierConfig(model=args.model, home=home, engine="llamacpp", flash_attn=flash,
                                             max_sessions=args.others + 2, link=LinkConfig(endpoint=CHILD_ENDPOINT)))
        client = Client(verifier=child.endpoint, draft=None, tokenizer=tok, home=home)
        client.generate(ids, 4)  # warm-up
        setups[flash] = (child, client)
    try:
        for r in range(args.rounds):
            for flash, (child, client) in setups.items():
                alone, lone_ids = ms_per_token(client, ids, 128)
                crowd = [Client(verifier=child.endpoint, draft=None, tokenizer=tok, home=home) for _ in others]
                for c, prompt in zip(crowd, others):
                    c.generate(prompt, 64)
                crowded, crowded_ids = ms_per_token(client, ids, 128)
                for c in crowd:
                    c.close()
                after, _ = ms_per_token(client, ids, 128)
                print(f"round {r} flash-attn {'on ' if flash else 'off'}: alone {alone:.2f} ms/token, with {len(others)} "
                      f"others held {crowded:.2f} ({crowded / alone:.2f}x), after they closed {after:.2f}; crowded "
                      f"output {'==' if crowded_ids == lone_ids else '!='} lone output", flush=True)
    finally:
        for child, client in setups.values():
            client.close()
            child.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What CURVE keys cost on tokens/s: the same target behind two verifiers on this host, one listening with
keys and one without, the same prompts interleaved (target alone, one token per step: the link is
crossed once per token, the most it can cost). A table, then one JSON line.

    python bench/curve_overhead.py [--limit 6] [-n 64] [--dataset humaneval] [-m TARGET]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=6)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("-m", "--model", default=None)
    args = p.parse_args()

    import zmq.auth

    from dovetail_rt import Client, data, store
    from dovetail_rt.bench import report
    from dovetail_rt.client import encode_prompt
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, VerifierConfig, dovetail_home
    from dovetail_rt.launcher import VerifierChild

    model = args.model or store.DEFAULT_TARGET
    tokenizer = store.load_tokenizer(model, dovetail_home())
    prompts = [encode_prompt(tokenizer, x.text, x.chat) for x in data.load(args.dataset)[: args.limit]]
    with tempfile.TemporaryDirectory() as keys:
        for name in ("verifier", "draft"):
            zmq.auth.create_certificates(keys, name)
        authorized = Path(keys) / "authorized"
        authorized.mkdir()
        (authorized / "draft.key").write_text((Path(keys) / "draft.key").read_text())
        keyed_link = LinkConfig(endpoint=CHILD_ENDPOINT, curve_secret_key=f"{keys}/verifier.key_secret",
                                authorized_keys=str(authorized))
        plain_cfg = VerifierConfig(model=model, home=dovetail_home(), link=LinkConfig(endpoint=CHILD_ENDPOINT))
        with VerifierChild(plain_cfg) as plain, VerifierChild(replace(plain_cfg, link=keyed_link)) as keyed:
            clients = {"plain": Client(verifier=plain.endpoint, draft=None, tokenizer=tokenizer),
                       "curve": Client(verifier=keyed.endpoint, draft=None, tokenizer=tokenizer,
                                       curve_secret_key=f"{keys}/draft.key_secret",
                                       curve_server_key=f"{keys}/verifier.key")}
            for c in clients.values():  # warm-up
                c.generate(prompts[0][:8], 4)
            rates = {k: [] for k in clients}
            for i, ids in enumerate(prompts):
                order = list(clients.items())
                for name, c in order if i % 2 == 0 else order[::-1]:  # interleaved, each first on every other prompt
                    st = c.generate(ids, args.n).stats
                    rates[name].append((st.n_generated - 1) / (st.seconds - st.ttft_s))
            for c in clients.values():
                c.close()
    ratios = [a / b for a, b in zip(rates["curve"], rates["plain"])]
    result = {"command": "python " + " ".join(sys.argv), "model": model, "dataset": args.dataset, "n": args.n,
              "machine": report.machine_info("-"), "commit": report.code_version(),
              "decode_tok_s_median": {k: statistics.median(v) for k, v in rates.items()},
              "curve_over_plain_median": statistics.median(ratios), "per_prompt_ratio": ratios}
    print(f"plain {result['decode_tok_s_median']['plain']:.2f} tok/s, CURVE {result['decode_tok_s_median']['curve']:.2f} "
          f"tok/s: CURVE / plain = {result['curve_over_plain_median']:.3f} (median over {len(ratios)} prompts)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

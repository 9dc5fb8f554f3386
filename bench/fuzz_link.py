"""Fuzz a live verifier over its real socket: hostile peers send N messages (a fixed seed) whose
fields hold hostile values (wrong types, NaN and infinities, negative and 64-bit-overflowing ints,
huge and nested lists, other peers' session ids, garbage frames), while a well-behaved client
generates greedily beside them. Reports crashes (the verifier died), hangs (a message unanswered
within the timeout), disturbed sessions (the good client's output changed), `internal` errors, and
the verifier's RSS before and after (hostile sessions ended or reclaimed). A table, then one JSON line.

    python bench/fuzz_link.py [--messages 100000] [--seed 0] [--peers 4] [-m qwen2.5-coder-0.5b]
                              [--tiny torch|llamacpp] [--aim 0.15]

The target is a real installed model (the 0.5B by default: refused messages cost nothing, and the
valid-looking ones it must run cost little), or with ``--tiny`` the tests' tiny random Llama (vocab 99)
on either engine, fast enough that ``--aim`` (the share of messages that are valid STARTs and VERIFYs
of the peer's own sessions: sampling settings, prompts and draft trees the model must run) can reach
the model paths tens of thousands of times."""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

TYPES = [1, 3, 4, 6]  # HELLO, START, VERIFY, END


def hostile_value(rng: random.Random, sessions: list[int], depth: int = 0):
    kind = rng.randrange(14)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)])
    if kind == 3:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5, 2.0])
    if kind == 5:
        return "".join(rng.choice("ab\u00e9\u4e2d\x00") for _ in range(rng.randrange(12)))
    if kind == 6:
        return rng.randbytes(rng.randrange(16))
    if kind == 7 and depth < 3:
        return [hostile_value(rng, sessions, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 8 and depth < 3:
        return {str(rng.randrange(5)): hostile_value(rng, sessions, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 9:
        return [rng.randrange(-5, 200_000) for _ in range(rng.choice([1, 8, 64, 300, 5000]))]
    if kind == 10:
        return [rng.randrange(0, 1000) for _ in range(rng.randrange(1, 24))]  # a valid-looking token list
    if kind == 11:
        return [rng.randrange(0, 4) for _ in range(rng.randrange(0, 6))]  # valid-looking parents
    if kind == 12 and sessions:
        return rng.choice(sessions)  # a session id: its own or another peer's
    return rng.randrange(0, 8)


def hostile_frames(rng: random.Random, sessions: list[int], own: list[int]) -> list[bytes]:
    """One message: garbage frames, or a typed message whose fields are hostile. Half the time its
    session is one this peer owns (or owned) and the token fields look valid."""
    if rng.random() < 0.05:  # garbage frames
        return [rng.randbytes(rng.randrange(0, 4)) for _ in range(rng.randrange(1, 4))]
    mtype = rng.choice(TYPES)
    keys = {1: ["vocab"], 3: ["session", "prompt", "temperature", "top_k", "top_p", "seed", "features"],
            4: ["session", "tokens", "parents"], 6: ["session"]}[mtype]
    fields = {k: hostile_value(rng, sessions) for k in keys if rng.random() < 0.85}
    if own and rng.random() < 0.5:
        fields["session"] = rng.choice(own)
        for key in ("prompt", "tokens"):
            if key in keys and rng.random() < 0.6:
                fields[key] = [rng.randrange(0, 1000) for _ in range(rng.randrange(0 if key == "tokens" else 1, 12))]
        if "parents" in keys and rng.random() < 0.6:
            n = len(fields["tokens"]) if isinstance(fields.get("tokens"), list) else rng.randrange(4)
            fields["parents"] = [rng.randrange(0, i + 1) for i in range(n)]
    if mtype == 1 and rng.random() < 0.5:
        fields["vocab"] = []  # an acceptable HELLO: it opens a session (up to the per-peer limit)
    version = 1 if rng.random() < 0.95 else hostile_value(rng, sessions)
    try:
        header = msgpack.packb([version, rng.randrange(1 << 30), fields])
    except (OverflowError, ValueError, TypeError):
        header = rng.randbytes(8)
    return [bytes([mtype]), header]


def aimed_frames(rng: random.Random, own: list[int], started: list[int], vocab: int) -> list[bytes]:
    """A valid message for the model paths: a HELLO while the peer has no session, else a START (random
    prompt and sampling settings) or a VERIFY (a random draft tree) of a session that answered a START
    (it may since have been ended, reclaimed or restarted by the peer's own hostile messages)."""
    if not own:
        mtype, fields = 1, {"vocab": []}
    elif not started or rng.random() < 0.3:
        mtype, fields = 3, {"session": rng.choice(own), "prompt": [rng.randrange(vocab) for _ in range(rng.randrange(1, 64))],
                            "temperature": rng.choice([0.0, 0.7, 1.5]), "top_k": rng.choice([0, 5, vocab]),
                            "top_p": rng.choice([1.0, 0.9, 0.01]), "seed": rng.randrange(2**63),
                            "features": rng.random() < 0.2}
    else:
        n = rng.randrange(0, 17)
        mtype, fields = 4, {"session": rng.choice(started), "tokens": [rng.randrange(vocab) for _ in range(n)],
                            "parents": [rng.randrange(0, i + 1) for i in range(n)]}
    return [bytes([mtype]), msgpack.packb([1, rng.randrange(1 << 30), fields])]


def tiny_model(engine: str, folder: Path) -> tuple[str, object, list[int]]:
    """The tests' tiny target (vocab 99, peaked) written for ``engine``: (its path, tokenizer, a prompt)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import save_model, tiny_target, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_target(0, sharpen=30)
    if engine == "llamacpp":
        from tiny_gguf import write_gguf

        vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        return str(write_gguf(model, vocab, folder / "tiny.gguf")), tok, [5, 7, 9, 11]
    return str(save_model(model, tok, folder / "tiny")), tok, [5, 7, 9, 11]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("-m", "--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--in-flight", type=int, default=8, help="messages a hostile peer sends before reading the replies")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a reply may take before it counts as a hang")
    p.add_argument("--tiny", choices=["torch", "llamacpp"], default=None,
                   help="instead of -m: the tests' tiny random Llama on this engine (fast: for --aim)")
    p.add_argument("--aim", type=float, default=0.0,
                   help="share of messages that are valid STARTs / VERIFYs of the peer's own sessions (model paths)")
    args = p.parse_args()

    import psutil

    from dovetail_rt import Client, protocol, store
    from dovetail_rt.bench import report
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, PlacementConfig, VerifierConfig, dovetail_home
    from dovetail_rt.launcher import VerifierChild

    import tempfile

    rng = random.Random(args.seed)
    scratch = tempfile.TemporaryDirectory()
    if args.tiny:
        args.model, tokenizer, prompt = tiny_model(args.tiny, Path(scratch.name))
        engine, dtype, vocab = args.tiny, "float32", 99
    else:
        tokenizer = store.load_tokenizer(args.model, dovetail_home())
        prompt = tokenizer("def fibonacci(n):", add_special_tokens=False)["input_ids"]
        engine, dtype, vocab = "auto", "auto", 1000
    counts = {"sent": 0, "answered": 0, "hangs": 0, "internal": 0, "codes": {}}
    config = VerifierConfig(model=args.model, home=dovetail_home(), engine=engine, dtype=dtype,
                            max_sessions=4 * args.peers + 4, idle_timeout_s=5, link=LinkConfig(endpoint=CHILD_ENDPOINT))
    with VerifierChild(config, PlacementConfig(threads=1 if args.tiny else None)) as child:
        rss = lambda: psutil.Process(child.proc.pid).memory_info().rss
        good = Client(verifier=child.endpoint, draft=None, tokenizer=tokenizer, timeout_s=args.timeout)
        expected = good.generate(prompt, 24).token_ids
        rss_start = rss()
        rss_samples: list[float] = []
        outputs, stop = [], threading.Event()

        def well_behaved():  # generates beside the flood, every output must be the first one
            while not stop.is_set():
                outputs.append(good.generate(prompt, 24).token_ids)

        ctx = zmq.Context.instance()
        peers = []
        for _ in range(args.peers):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(child.endpoint)
            peers.append(s)
        sessions = [good.session]  # ids the hostile peers may aim at: the good one's and their own
        owned = {sock: [] for sock in peers}  # each hostile peer's own sessions
        started = {sock: [] for sock in peers}  # those that answered a START
        worker = threading.Thread(target=well_behaved)
        worker.start()
        t0 = time.perf_counter()
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.messages, desc="hostile messages", unit="msg", mininterval=5, file=sys.stderr)
            while counts["sent"] < args.messages and child.proc.poll() is None:
                sock = rng.choice(peers)
                burst = min(args.in_flight, args.messages - counts["sent"])
                for _ in range(burst):  # several in flight: the verifier takes what waits together
                    aimed = rng.random() < args.aim
                    sock.send_multipart(aimed_frames(rng, owned[sock], started[sock], vocab) if aimed
                                        else hostile_frames(rng, sessions, owned[sock]))
                counts["sent"] += burst
                bar.update(burst)
                if counts["sent"] * 10 // args.messages > len(rss_samples):  # every tenth of the run: growth or plateau?
                    rss_samples.append(round(rss() / 2**20, 1))
                for _ in range(burst):
                    if not sock.poll(args.timeout * 1000):
                        counts["hangs"] += 1
                        break
                    try:
                        reply = protocol.decode(sock.recv_multipart())
                    except protocol.ProtocolError:
                        counts["codes"]["undecodable reply"] = counts["codes"].get("undecodable reply", 0) + 1
                        continue
                    counts["answered"] += 1
                    code = reply.fields.get("code", reply.type.name) if reply.type == protocol.MsgType.ERROR else reply.type.name
                    counts["codes"][code] = counts["codes"].get(code, 0) + 1
                    counts["internal"] += code == "internal"
                    if reply.type == protocol.MsgType.BYE:  # ended by its own hostile END: aim elsewhere
                        for held in (owned[sock], started[sock]):
                            if reply.fields.get("session") in held:
                                held.remove(reply.fields.get("session"))
                    if reply.type == protocol.MsgType.RESULT and reply.fields.get("session") not in started[sock]:
                        started[sock].append(reply.fields.get("session"))
                    if reply.type == protocol.MsgType.WELCOME:
                        sessions.append(reply.fields["session"])
                        owned[sock].append(reply.fields["session"])
            bar.close()
        finally:
            stop.set()
            worker.join()
        seconds = time.perf_counter() - t0
        alive = child.proc.poll() is None
        for sock in peers:  # the hostile peers vanish without END: their sessions must be reclaimed
            sock.close(0)
        time.sleep(6.5)  # past --idle-timeout 5: the verifier reclaims what they left
        rss_end = rss() if alive else 0
        disturbed = sum(o != expected for o in outputs)
        good.close()
    result = {
        "command": "python " + " ".join(sys.argv), "model": f"tiny ({args.tiny})" if args.tiny else args.model,
        "aim": args.aim, "model_replies": counts["codes"].get("RESULT", 0), "seed": args.seed, "messages": counts["sent"],
        "answered": counts["answered"], "seconds": round(seconds, 1), "crashed": not alive, "hangs": counts["hangs"],
        "internal_errors": counts["internal"], "good_generations": len(outputs), "disturbed": disturbed,
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_change": round(rss_end / rss_start - 1, 4) if alive else None, "rss_every_tenth_mib": rss_samples,
        "replies": counts["codes"],
        "machine": report.machine_info("-"), "commit": report.code_version(),
    }
    print(f"{counts['sent']} hostile messages in {seconds:.0f} s: crashed {result['crashed']}, hangs {counts['hangs']}, "
          f"internal errors {counts['internal']}, good generations {len(outputs)} ({disturbed} disturbed), "
          f"RSS {result['rss_start_mib']} -> {result['rss_end_mib']} MiB ({100 * (result['rss_change'] or 0):+.1f} %); "
          f"{result['model_replies']} RESULTs (messages the model ran); RSS at each tenth of the run: "
          f"{', '.join(map(str, rss_samples))} MiB")
    for code, n in sorted(counts["codes"].items(), key=lambda kv: -kv[1]):
        print(f"  {code:20s} {n}")
    out = Path("bench/results") / time.strftime("fuzz-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    result["results_file"] = str(out)
    print(json.dumps(result))
    return 0 if alive and not counts["hangs"] and not disturbed and not counts["internal"] else 1


if __name__ == "__main__":
    sys.exit(main())

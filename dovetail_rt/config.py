"""Frozen, validated configuration: one dataclass per process, one for the link between them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # per message; features of a long prompt fit easily


def dovetail_home(env: dict | None = None) -> Path:
    """Where installed models and caches live: $DOVETAIL_HOME or ~/.cache/dovetail."""
    env = os.environ if env is None else env
    return Path(env.get("DOVETAIL_HOME") or Path.home() / ".cache" / "dovetail")


LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost", "tcp://[::1]", "ipc://", "inproc://")
CHILD_ENDPOINT = "tcp://127.0.0.1:0"  # a verifier child (run, serve, bench) listens on a free loopback port


@dataclass(frozen=True)
class LinkConfig:
    """The ZeroMQ link. Off-host it is authenticated and encrypted with CURVE (``dovetail keys
    generate``): the verifier holds its secret key and a folder of the draft hosts' public keys it
    accepts; a draft host holds its own secret key and the verifier's public key."""

    endpoint: str = "tcp://127.0.0.1:5557"
    timeout_s: float = 60.0  # every receive; a prefill of a long prompt on a slow CPU fits in it
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    curve_secret_key: str | None = None  # this side's secret key file (NAME.key_secret)
    curve_server_key: str | None = None  # draft side: the verifier's public key file (NAME.key)
    authorized_keys: str | None = None  # verifier side: folder of the public keys of the draft hosts it serves
    insecure: bool = False  # verifier side: listen beyond this host without keys

    @property
    def loopback(self) -> bool:
        return self.endpoint.startswith(LOOPBACK_PREFIXES)

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    def __post_init__(self):
        if "://" not in self.endpoint:
            raise ValueError(f"endpoint '{self.endpoint}' needs a transport, e.g. tcp://127.0.0.1:5557")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max message size must be >= 1024 bytes, got {self.max_message_bytes}")
        if self.curve_server_key and not self.curve_secret_key:
            raise ValueError("--curve-server-key needs --curve-secret-key too (this host's own key pair: "
                             "dovetail keys generate DIR)")
        for path in (self.curve_secret_key, self.curve_server_key):
            if path and not Path(path).is_file():
                raise ValueError(f"no key file {path}: make a key pair with `dovetail keys generate DIR`")
        if self.authorized_keys and not Path(self.authorized_keys).is_dir():
            raise ValueError(f"--authorized-keys {self.authorized_keys} is not a folder of public key files")

    def check_listen(self) -> None:
        """The verifier's rule: beyond this host only with keys (or --insecure, said at start-up)."""
        if self.curve and not self.authorized_keys:
            raise ValueError("--curve-secret-key needs --authorized-keys DIR: the public keys (NAME.key) of the draft "
                             "hosts this verifier serves")
        if not self.loopback and not self.curve and not self.insecure:
            raise ValueError(
                f"listening on {self.endpoint} reaches other hosts, and without keys anyone there could drive the "
                "target. Make keys: `dovetail keys generate KEYS --name verifier` here and `dovetail keys generate KEYS "
                "--name draft` on each draft host, copy the draft hosts' draft.key into a folder here, then start with "
                "--curve-secret-key KEYS/verifier.key_secret --authorized-keys FOLDER (and give the draft hosts "
                "--curve-secret-key KEYS/draft.key_secret --curve-server-key verifier.key). On a network you trust "
                "completely, --insecure listens without them.")


ENGINE_CHOICES = ("auto", "torch", "llamacpp")


@dataclass(frozen=True)
class VerifierConfig:
    model: str
    home: Path
    engine: str = "auto"  # auto: llamacpp for a GGUF target (an installed default keeps its GGUF), else torch
    dtype: str = "auto"  # torch engine: auto | float32 | bfloat16 (llama.cpp runs the file's own format)
    n_ctx: int = 4096  # llamacpp engine: KV cache tokens per session
    max_sessions: int = 16  # past it HELLO is refused with ``busy`` (no session is ever closed to make room)
    max_sessions_per_peer: int = 4  # sessions one peer may hold: a connection, or (CURVE) an authorized host's key
    idle_timeout_s: float = 600.0  # a session unused this long is closed and its KV memory freed
    prefill_chunk: int = 64  # prompt tokens per pass: a long prompt stalls other sessions' steps at most this long
    kv_budget: int = 0  # llamacpp engine: KV tokens all sessions share; 0 = n_ctx x max_sessions (at most 1/4 of free RAM)
    max_draft_tokens: int = 128  # per VERIFY request
    flash_attn: bool = False  # llamacpp engine: on, a session's step skips other sessions' KV cells (f16 sums: not exact)
    prefix_cache: int | None = None  # KV tokens finished sessions leave for prompts that start with them; None: n_ctx
    link: LinkConfig = LinkConfig()

    def __post_init__(self):
        self.link.check_listen()
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got '{self.engine}'")
        if self.n_ctx < 64:
            raise ValueError(f"--ctx-size must be >= 64 tokens, got {self.n_ctx}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got '{self.dtype}'")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if not 1 <= self.prefill_chunk <= 256:
            raise ValueError(f"--prefill-chunk must be 1..256 tokens (the engine's batch), got {self.prefill_chunk}")
        if self.max_sessions_per_peer < 1 or self.idle_timeout_s <= 0:
            raise ValueError("--max-sessions-per-peer must be >= 1 and --idle-timeout > 0")
        if self.kv_budget and self.kv_budget < self.n_ctx:
            raise ValueError(f"--kv-budget {self.kv_budget} is less than one session's --ctx-size {self.n_ctx}")
        if self.max_draft_tokens < 1:
            raise ValueError("--max-draft-tokens must be >= 1")
        if self.prefix_cache is not None and self.prefix_cache < 0:
            raise ValueError(f"--prefix-cache must be >= 0 tokens (0: off), got {self.prefix_cache}")

    def as_dict(self) -> dict:
        """Every field as JSON (the child reports the config it runs, so a parent can check it)."""
        return {**asdict(self), "home": str(self.home)}


@dataclass(frozen=True)
class PlacementConfig:
    """Where a verifier is asked to run; ``placement.choose`` resolves it in the verifier's own process
    (it reads that host's NUMA topology and the CPUs it may use)."""

    threads: int | None = None  # None: one per physical core of the node
    cpus: str | None = None  # a CPU list, e.g. "0-7,16-23"; None: the node's cores
    numa_node: int | None = None  # None: the node with the most usable cores

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.cpus is not None:
            from .placement import parse_cpulist

            parse_cpulist(self.cpus)  # a malformed list fails here, in the parent, with its message


DRAFT_MAX = 16  # the chain cap where the verification curve is steep or unknown (8/16/24 measured alike there)
TREE_TOKENS = 8  # the tree size there, root included (bf16 T_V(1 / 8 / 16) = 181 / 235 / 310 ms, 2-core AMD)
FLAT = 2.0  # a curve is flat up to the q it verifies for at most this many one-token steps (cost.sized)
WIDEST = 32  # the largest draft the caps grow to on a flat curve


@dataclass(frozen=True)
class DraftConfig:
    """How the draft side proposes tokens.

    Chains (tree_top_k = 1): up to draft_max tokens; past draft_min, a chain grows while one more
    token raises the expected tokens/s (cost.py: measured verification curve, draft time,
    acceptance); before those are measured, or with adaptive off, it stops when the draft's top
    probability falls under p_min. An n-gram lookup draft (-md ngram) sends at most draft_max nodes,
    branching tree_top_k (default 3). Trees (tree_top_k > 1): EAGLE-2 style dynamic
    trees of tree_depth rounds keeping the best tree_tokens - 1 draft nodes, then (adaptive) cut to
    the size the cost model prefers.
    """

    draft_max: int | None = None  # a cap (None: cost.sized sets it from the curve); the cost model picks below it
    draft_min: int = 0
    p_min: float = 0.4
    adaptive: bool = True  # size chains and trees from the cost model once it has measurements
    tree_top_k: int | None = None  # None: the draft kind's default (small LM: 1 = chains; head: 4)
    tree_depth: int = 5
    tree_tokens: int | None = None  # root included; None: cost.sized sets it from the curve
    lookup_min: int = 1  # n-gram lookup (-md ngram): the shortest and longest context tail it matches
    lookup_max: int = 8

    def __post_init__(self):
        if not 0 <= self.draft_min <= (DRAFT_MAX if self.draft_max is None else self.draft_max):
            raise ValueError(f"need 0 <= --draft-min <= --draft-max, got {self.draft_min} and {self.draft_max}")
        if not 0 <= self.p_min <= 1:
            raise ValueError(f"--draft-p-min must be in [0, 1], got {self.p_min}")
        if (self.tree_top_k is not None and self.tree_top_k < 1) or self.tree_depth < 1 or (self.tree_tokens or 2) < 2:
            raise ValueError("trees need top_k >= 1, depth >= 1 and tokens >= 2")
        if not 1 <= self.lookup_min <= self.lookup_max:
            raise ValueError(f"need 1 <= --lookup-min <= --lookup-max, got {self.lookup_min} and {self.lookup_max}")

    @property
    def is_tree(self) -> bool:
        return (self.tree_top_k or 1) > 1


@dataclass(frozen=True)
class ClientConfig:
    """The draft side of `generate`, `run` and `serve` (``Client.from_config``): which draft, on what
    device and engine, how it proposes, and the link to the verifier (whose endpoint `run` and `serve`
    replace with their child's when they start one)."""

    draft: str | None = "qwen2.5-coder-0.5b"  # a draft spec for open_draft (None: the target alone)
    draft_config: DraftConfig = DraftConfig()
    device: str = "cpu"  # cpu | cuda[:N] | auto
    dtype: str = "auto"  # the draft model's dtype (torch engine)
    engine: str = "auto"  # the draft model's engine
    link: LinkConfig = LinkConfig()


@dataclass(frozen=True)
class ServeConfig:
    """`dovetail serve`: an OpenAI-compatible HTTP server in front of a verifier (its own child, or a
    remote one), the draft loaded once and shared by every request."""

    model: str  # the model id clients name (with a child: its target)
    home: Path
    client: ClientConfig = ClientConfig()  # every request's draft side (its link: a remote verifier's)
    verifiers: tuple[str, ...] = ()  # running verifiers' endpoints (verifier_pool.py); (): start the ``child``
    child: VerifierConfig | None = None  # the verifier child's config (when ``verifiers`` is empty)
    placement: PlacementConfig = PlacementConfig()  # where the child runs
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4  # requests generating at once per verifier (one verifier session each)
    queue: int = 64  # requests waiting for a slot; past it: 503 with Retry-After
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ("*",)  # browser origins allowed to call the API (() = none)
    aliases: tuple[str, ...] = ()  # more model names /v1/models lists (any name is answered)

    def __post_init__(self):
        if not 1 <= self.parallel <= 256:
            raise ValueError(f"--parallel must be 1..256, got {self.parallel}")
        if self.queue < 0:
            raise ValueError(f"--queue must be >= 0, got {self.queue}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty")
        if (not self.verifiers) == (self.child is None):
            raise ValueError("serve needs either running verifiers' endpoints or a child verifier's config")
        if len(set(self.verifiers)) < len(self.verifiers):
            raise ValueError(f"--verifier names an endpoint twice: {', '.join(self.verifiers)}")
        if self.child is not None and self.child.max_sessions < self.parallel + 1:
            raise ValueError(f"--max-sessions {self.child.max_sessions} is below --parallel + 1 = {self.parallel + 1}: "
                             "each running request holds a verifier session, and a resuming one briefly holds two")


@dataclass(frozen=True)
class BenchConfig:
    """One `dovetail bench` run (``bench.harness.run``): what to compare, on what, and how long."""

    model: str
    model_draft: str
    engine: str = "auto"  # comma list: every engine after the first adds its own rows (ROW@ENGINE)
    draft_engine: str = "auto"
    dtype: str = "auto"  # torch engine's target dtype, also for hf rows
    draft_dtype: str = "auto"
    systems: str = "target,hf,hf-assisted,dovetail,llamacpp,llamacpp-spec"
    llamacpp_ngram: str = "ngram-mod"  # --spec-type(s) of the llamacpp-ngram rows
    lookup_max: int = DraftConfig.lookup_max
    head: str | None = None  # draft head folders, comma separated
    trees: str | None = None  # TOPK:DEPTH:TOKENS,... for the tree rows
    draft_max: int | None = None
    cost_model: str = "on"  # on | off | both
    dataset: str = "humaneval"
    prompts: str | None = None  # a JSONL file instead of --dataset
    limit: str = "10"  # prompts per dataset, or one number per dataset
    n_predict: int = 128
    temp: float = 0.0
    seed: int = 0
    command_line: str = ""  # what was run, for the results file

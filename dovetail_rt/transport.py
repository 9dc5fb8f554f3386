"""ZeroMQ sockets: the one place for socket options, timeouts, size limits and disconnect watch."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from . import protocol
from .config import LinkConfig
from .protocol import Message

log = logging.getLogger(__name__)


class LinkError(RuntimeError):
    """The peer is gone, silent past the timeout, or sent something unusable."""


class LinkLost(LinkError):
    """The verifier stopped answering or closed the connection: a new session may recover."""


def _common(sock: zmq.Socket, max_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # Hard cap per frame in the ZeroMQ engine (a peer that exceeds it is disconnected); the
    # protocol's own, lower limit on whole messages answers with an ERROR instead.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes)


def load_key(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys from a `dovetail keys generate` file; clear errors for the wrong file."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise LinkError(f"cannot read the key file {path}: {exc}") from exc
    if secret and secret_key is None:
        raise LinkError(f"{path} holds a public key only: give the NAME.key_secret file of this host's key pair")
    return public, secret_key


class CappedWarnings:
    """Warnings about peers, at most ``limit`` per ``window_s``, then one line counting the rest: a peer
    that sends garbage or knocks with unknown keys must not fill the disk."""

    def __init__(self, logger: logging.Logger, limit: int = 20, window_s: float = 10.0):
        self.log, self.limit, self.window_s = logger, limit, window_s
        self.start, self.count = time.monotonic(), 0

    def __call__(self, text: str, *args) -> None:
        now = time.monotonic()
        if now - self.start > self.window_s:
            if self.count > self.limit:
                self.log.warning("... and %d more warnings about peers in those %.0f s (not logged one by one)",
                                 self.count - self.limit, self.window_s)
            self.start, self.count = now, 0
        self.count += 1
        if self.count <= self.limit:
            self.log.warning(text, *args)


class HostKeys(ThreadAuthenticator):
    """ZAP (a thread of ``zmq.auth``) for a CURVE verifier: admits the draft hosts whose public keys
    (NAME.key files of `dovetail keys generate`) are in the ``--authorized-keys`` folder, read at start;
    logs each refused key (capped); and names every admitted connection after its key file (the
    frames' ``User-Id``), so the verifier counts sessions per host, not per connection."""

    def __init__(self, ctx: zmq.Context, folder: str):
        super().__init__(ctx, log=logging.getLogger("dovetail_rt.auth"))
        self.folder, self.names = folder, {}
        try:
            for path in sorted(Path(folder).glob("*.key")):
                self.names[zmq.auth.load_certificate(path)[0]] = path.stem
        except (OSError, ValueError) as exc:
            raise LinkError(f"cannot read the authorized keys in {folder}: {exc}") from exc
        if not self.names:
            raise LinkError(f"the --authorized-keys folder {folder} holds no public keys: copy each draft host's "
                            "NAME.key file there (`dovetail keys generate` writes it)")
        self.warn = CappedWarnings(self.log)

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """``key``: a connecting host's public key, Z85."""
        if key in self.names:
            return True
        self.warn("refused a draft host whose key %s... is not in %s (to admit it, copy its NAME.key there and "
                  "restart the verifier)", key[:10].decode(errors="replace"), self.folder)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "?")


def peer_host(frame: zmq.Frame) -> str | None:
    """The authorized host a received frame came from (its key file's name), on a CURVE socket."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def bind_router(ctx: zmq.Context, link: LinkConfig) -> tuple[zmq.Socket, str, object | None]:
    """The verifier's socket, the endpoint actually bound (port 0 -> real port) and, with CURVE, the
    ZAP authenticator (``HostKeys``) that admits only the authorized draft hosts' keys; stop it after
    closing the socket."""
    auth = None
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, link.max_message_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
    try:
        if link.curve:
            public, secret = load_key(link.curve_secret_key, secret=True)
            auth = HostKeys(ctx, link.authorized_keys)
            auth.start()
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        elif not link.loopback:
            log.warning("listening on %s WITHOUT keys (--insecure): anyone who reaches it drives the target",
                        link.endpoint)
        sock.bind(link.endpoint)
    except (zmq.ZMQError, LinkError) as exc:
        sock.close()
        if auth is not None:
            auth.stop()
        if isinstance(exc, LinkError):
            raise
        raise LinkError(f"cannot listen on {link.endpoint}: {exc} (is another verifier using that port?)") from exc
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), auth


class Connection:
    """The draft side's link to one verifier: request/reply with a timeout and disconnect watch."""

    def __init__(self, endpoint: str, timeout_s: float, max_bytes: int, ctx: zmq.Context | None = None,
                 curve: tuple[str, str] | None = None):
        """``curve``: (this host's secret key file, the verifier's public key file)."""
        self.endpoint, self.timeout_s, self.max_bytes = endpoint, timeout_s, max_bytes
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        _common(self.sock, max_bytes)
        if curve:
            public, secret = load_key(curve[0], secret=True)
            self.sock.curve_secretkey, self.sock.curve_publickey = secret, public
            self.sock.curve_serverkey = load_key(curve[1], secret=False)[0]
        # ZMTP heartbeats: a peer host that dies without closing TCP is noticed within ~10 s.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED |
                                                    zmq.EVENT_HANDSHAKE_FAILED_AUTH |
                                                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.connected_once = False
        self.seq = 0
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.sock.connect(endpoint)

    def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send one message and wait for the reply with the same seq. Raises LinkError."""
        self.seq += 1
        msg.seq = self.seq
        self.sock.send_multipart(protocol.encode(msg), copy=False)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hint = "" if self.connected_once else " (no connection was ever made: is `dovetail verifier` running there?)"
                raise LinkLost(f"verifier at {self.endpoint} did not answer within {timeout_s or self.timeout_s:.1f} s{hint}")
            events = dict(self.poller.poll(timeout=left * 1000))
            if self.monitor in events:
                self._check_monitor()
            if self.sock in events:
                frames = self.sock.recv_multipart(copy=False)
                try:
                    reply = protocol.decode(frames, self.max_bytes)
                except protocol.ProtocolError as exc:
                    raise LinkError(f"unusable reply from {self.endpoint}: {exc}") from exc
                if reply.seq == self.seq:
                    return reply
                log.debug("dropping stale reply seq %d (waiting for %d)", reply.seq, self.seq)

    def _check_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected_once = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise LinkError(f"the verifier at {self.endpoint} refused this host's key: add this host's public "
                                "key (NAME.key) to the verifier's --authorized-keys folder")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                raise LinkError(f"the security handshake with {self.endpoint} failed: both sides need keys (CURVE) or "
                                "neither; check --curve-server-key is the verifier's public key")
            elif event == zmq.EVENT_DISCONNECTED:
                raise LinkLost(f"verifier at {self.endpoint} closed the connection (it stopped or crashed)")

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)

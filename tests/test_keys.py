"""The link off-host: CURVE keys (`dovetail keys generate`), a verifier that serves only the draft hosts
whose keys it holds, and one that refuses to listen beyond this host without keys."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from dovetail_rt import Client
from dovetail_rt.client import VerifierError
from dovetail_rt.config import DraftConfig, LinkConfig
from dovetail_rt.transport import LinkError

from conftest import ROOT, VerifierProcess


def dovetail(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dovetail_rt.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    for name in ("verifier", "draft", "stranger"):
        res = dovetail("keys", "generate", str(root / name), "--name", name)
        assert res.returncode == 0, res.stderr
    authorized = root / "authorized"
    authorized.mkdir()
    (authorized / "draft.key").write_text((root / "draft" / "draft.key").read_text())
    return root


def test_keys_generate_writes_a_private_secret_and_never_overwrites(keys):
    secret = keys / "draft" / "draft.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in (keys / "draft" / "draft.key").read_text()
    res = dovetail("keys", "generate", str(keys / "draft"), "--name", "draft")
    assert res.returncode == 2 and "exists already" in res.stderr


@pytest.fixture(scope="module")
def curve_verifier(tiny_dir, keys):
    v = VerifierProcess(tiny_dir, "--curve-secret-key", str(keys / "verifier" / "verifier.key_secret"),
                        "--authorized-keys", str(keys / "authorized"))
    yield v
    v.stop()


@pytest.mark.timeout(120)
def test_an_authorized_draft_host_is_served_over_curve(curve_verifier, keys):
    with Client(verifier=curve_verifier.endpoint, draft=None, timeout_s=20,
                curve_secret_key=str(keys / "draft" / "draft.key_secret"),
                curve_server_key=str(keys / "verifier" / "verifier.key")) as client:
        out = client.generate([5, 7, 9], max_new_tokens=8)
    assert out.stats.n_generated == 8


@pytest.mark.timeout(120)
def test_an_unknown_key_gets_nothing(curve_verifier, keys):
    with pytest.raises(LinkError, match="refused this host's key"):
        Client(verifier=curve_verifier.endpoint, draft=None, timeout_s=10,
               curve_secret_key=str(keys / "stranger" / "stranger.key_secret"),
               curve_server_key=str(keys / "verifier" / "verifier.key"))


@pytest.mark.timeout(120)
def test_a_plain_text_client_gets_nothing(curve_verifier):
    with pytest.raises(LinkError):
        Client(verifier=curve_verifier.endpoint, draft=None, timeout_s=5)


def test_a_verifier_refuses_to_listen_beyond_this_host_without_keys(tiny_dir):
    res = dovetail("verifier", "-m", str(tiny_dir), "--listen", "tcp://0.0.0.0:0", "-t", "1")
    assert res.returncode == 2 and "dovetail keys generate" in res.stderr and "--insecure" in res.stderr
    with pytest.raises(ValueError, match="--authorized-keys"):
        LinkConfig(endpoint="tcp://0.0.0.0:5557", curve_secret_key=__file__).check_listen()
    LinkConfig(endpoint="tcp://0.0.0.0:5557", insecure=True).check_listen()  # said at start-up, allowed
    LinkConfig(endpoint="tcp://127.0.0.1:5557").check_listen()  # loopback stays key-less


@pytest.fixture(scope="module")
def two_hosts(keys, tmp_path_factory):
    """Keys of two authorized draft hosts, 'draft' and 'other'."""
    res = dovetail("keys", "generate", str(keys / "other"), "--name", "other")
    assert res.returncode == 0, res.stderr
    authorized = tmp_path_factory.mktemp("two_hosts")
    for name in ("draft", "other"):
        (authorized / f"{name}.key").write_text((keys / name / f"{name}.key").read_text())
    return authorized


def curve_client(endpoint, keys, host, timeout_s=20):
    return Client(verifier=endpoint, draft=None, timeout_s=timeout_s, curve_secret_key=str(keys / host / f"{host}.key_secret"),
                  curve_server_key=str(keys / "verifier" / "verifier.key"))


@pytest.mark.timeout(120)
def test_a_host_key_holds_its_session_quota_over_any_number_of_connections(tiny_dir, keys, two_hosts, tmp_path):
    """On a CURVE link the per-peer limit counts a host's key, not its connections: a host that opens
    more connections gets `busy` past its quota, and the other host is still served."""
    log = tmp_path / "verifier.log"
    v = VerifierProcess(tiny_dir, "--curve-secret-key", str(keys / "verifier" / "verifier.key_secret"),
                        "--authorized-keys", str(two_hosts), "--max-sessions-per-peer", "2", "-v", log_file=log)
    opened = []
    try:
        opened += [curve_client(v.endpoint, keys, "draft") for _ in range(2)]  # two connections, one session each
        with pytest.raises(VerifierError) as refused:
            curve_client(v.endpoint, keys, "draft")
        assert refused.value.code == "busy" and "host draft" in str(refused.value)
        with curve_client(v.endpoint, keys, "other") as other:
            assert other.generate([5, 7, 9], max_new_tokens=4).stats.n_generated == 4
        opened.pop().close()  # the host ENDs one: its next connection is served
        opened.append(curve_client(v.endpoint, keys, "draft"))
        assert "opened for host draft" in log.read_text() and "opened for host other" in log.read_text()
    finally:
        for c in opened:
            c.close()
        v.stop()


@pytest.mark.timeout(120)
def test_strangers_are_refused_and_logged_beside_a_generating_client(tiny_dir, keys, tmp_path):
    """While an authorized host generates, an unknown key and a plain-text client knock again and again:
    they get nothing, each refusal of a key is logged, and the generation is exactly as alone."""
    log = tmp_path / "verifier.log"
    v = VerifierProcess(tiny_dir, "--curve-secret-key", str(keys / "verifier" / "verifier.key_secret"),
                        "--authorized-keys", str(keys / "authorized"), "-v", log_file=log)
    try:
        with curve_client(v.endpoint, keys, "draft") as client:
            alone = client.generate([5, 7, 9], max_new_tokens=64).token_ids
            result, refusals = {}, []

            def generate():
                result["ids"] = client.generate([5, 7, 9], max_new_tokens=64).token_ids

            thread = threading.Thread(target=generate)
            thread.start()
            for i in range(6):
                try:
                    if i % 2:
                        Client(verifier=v.endpoint, draft=None, timeout_s=3)
                    else:
                        curve_client(v.endpoint, keys, "stranger", timeout_s=3)
                except LinkError as exc:
                    refusals.append(exc)
            thread.join()
        assert len(refusals) == 6
        assert result["ids"] == alone
        text = log.read_text()
        assert text.count("refused a draft host whose key") == 3  # one per stranger connection (each tried once)
        assert text.count(" opened for host ") == 1  # the generating client's session: nobody else got one
    finally:
        v.stop()

"""The link off-host: CURVE keys (`dovetail keys generate`), a verifier that serves only the draft hosts
whose keys it holds, and one that refuses to listen beyond this host without keys."""

import os
import stat
import subprocess
import sys

import pytest

from dovetail_rt import Client
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

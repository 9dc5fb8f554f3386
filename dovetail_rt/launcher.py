"""Start `dovetail verifier` as a child process on this host and stop it on every exit path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class VerifierChild:
    """The verifier in a child process listening on a free 127.0.0.1 port.

    The child reports its endpoint through a pipe once it listens (no sleeps, no polling), and
    dies with its parent (PR_SET_PDEATHSIG + a parent check), so nothing is left orphaned. The
    death signal follows the *thread* that started the child: start it from a thread that lives as
    long as it should (``wait=False`` starts it and returns; ``wait_ready()`` then blocks elsewhere).
    """

    def __init__(self, model: str, dtype: str = "auto", extra: list[str] | None = None, env: dict | None = None,
                 wait: bool = True, log_file: Path | None = None):
        """``log_file``: the verifier's log (stderr) goes there, appended, instead of to this process's."""
        self.model, self.extra, self.env = ["-m", model, "--dtype", dtype], list(extra or []), env
        self.log_file = log_file
        self._spawn()
        if wait:
            self.wait_ready()

    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "dovetail_rt.cli", "verifier", *self.model, "--listen", "tcp://127.0.0.1:0",
               "--ready-fd", str(write_fd), "--exit-with-parent", *self.extra]
        log = open(self.log_file, "ab") if self.log_file else None
        self.proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, env=self.env, stderr=log)
        if log:
            log.close()  # the child holds its own copy
        os.close(write_fd)
        self.ready_fd, self.endpoint, self.target = read_fd, "", {}

    def exited(self, wait_s: float = 2.0) -> bool:
        """Whether the child has exited, given the moments a dying one takes (its connection can close
        before the process is gone)."""
        try:
            self.proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def restart(self) -> str:
        """A new child with the same model and flags (after this one died); its endpoint."""
        self.stop()
        self._spawn()
        return self.wait_ready().endpoint

    def wait_ready(self) -> "VerifierChild":
        """Block until the child listens (its endpoint and what it runs), or raise if it exited first."""
        with os.fdopen(self.ready_fd) as ready:
            self.endpoint = ready.readline().strip()
            line = ready.readline().strip()
        self.target = json.loads(line) if line else {}  # engine, weight format and file it runs
        if not self.endpoint:
            code = self.proc.wait()
            where = f"in {self.log_file}" if self.log_file else "above"
            raise RuntimeError(f"the verifier exited (code {code}) before it was ready; see its messages {where}")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "VerifierChild":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Start `dovetail verifier` as a child process on this host and stop it on every exit path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from .config import PlacementConfig, VerifierConfig

# What a user can do about a child that died of a signal (the kernel's name for it first).
_ADVICE = {
    "SIGSEGV": "a crash in the engine's native code: try `--engine torch`, or `python -m dovetail_rt.kernels probe` "
               "to see which llama.cpp kernels pass on this CPU (`bash launch/setup.sh` rebuilds llama-cpp-python for it)",
    "SIGILL": "an instruction this CPU lacks: llama-cpp-python was built for another CPU; `bash launch/setup.sh` "
              "builds it for this one",
    "SIGBUS": "a memory-mapped model file changed or its disk failed: check the file (`dovetail models install`)",
    "SIGABRT": "the engine aborted (its last lines say why); run with -v for its log",
    "SIGKILL": "killed from outside, most often by the out-of-memory killer: lower --ctx-size or --max-sessions",
}


def signal_name(number: int) -> str:
    """SIGSEGV for 11; a signal Python has no name for (a real-time one) by its number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_words(log: list[str], n: int) -> list[str]:
    """The lines that say why: before a native crash (faulthandler's "Fatal Python error"), what the
    child last logged, the error and the frames it was in; otherwise its last ``n`` lines."""
    fatal = next((i for i in range(len(log) - 1, -1, -1) if log[i].startswith("Fatal Python error")), None)
    if fatal is None:
        return log[-n:]
    after = log[fatal + 1:]
    current = next((i for i, l in enumerate(after) if l.startswith("Current thread")), None)
    frames = [] if current is None else [l for l in after[current:current + 6] if l.startswith(("Current", "  File"))]
    return log[max(0, fatal - 3):fatal + 1] + frames


class VerifierChild:
    """The verifier of ``config`` in a child process, placed as ``where`` asks (``config.link`` is a
    loopback endpoint, port 0 for a free one: `run`, `serve`, the bench and the tests use
    ``CHILD_ENDPOINT``).

    The config crosses as `dovetail verifier` options built in one place (``verifier_options.verifier_argv``) and
    the child reports back, through a pipe once it listens (no sleeps, no polling), its endpoint and
    the config it runs (``target["config"]``). It dies with its parent (PR_SET_PDEATHSIG + a parent
    check), so nothing is left orphaned. The death signal follows the *thread* that started the
    child: start it from a thread that lives as long as it should (``wait=False`` starts it and
    returns; ``wait_ready()`` then blocks elsewhere).
    """

    def __init__(self, config: VerifierConfig, where: PlacementConfig = PlacementConfig(), env: dict | None = None,
                 wait: bool = True, log_file: Path | None = None, verbose: bool = False):
        """``log_file``: the verifier's log (stderr) goes there, appended, instead of to this process's;
        ``verbose``: it logs at debug level (so does a parent that does)."""
        self.config, self.where, self.env, self.verbose = config, where, env, verbose
        self.log_file = log_file
        self._spawn()
        if wait:
            self.wait_ready()

    def _spawn(self) -> None:
        from .verifier_options import verifier_argv

        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "dovetail_rt.cli", "verifier", *verifier_argv(self.config, self.where, self.verbose),
               "--ready-fd", str(write_fd), "--exit-with-parent"]
        env = {**(os.environ if self.env is None else self.env), "DOVETAIL_HOME": str(self.config.home)}
        self.proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, env=env,
                                     stderr=subprocess.PIPE)
        os.close(write_fd)
        self.ready_fd, self.endpoint, self.target = read_fd, "", {}
        self.last_lines: deque[str] = deque(maxlen=40)  # the child's latest log lines, for a death report
        self._relay = threading.Thread(target=self._relay_log, args=(self.proc.stderr, self.last_lines), daemon=True,
                                       name="dovetail-verifier-log")
        self._relay.start()

    def _relay_log(self, pipe, last_lines: deque) -> None:
        """The child's stderr goes on to ours (or to ``log_file``), and its last lines are kept."""
        out = None
        try:
            out = open(self.log_file, "a", encoding="utf-8") if self.log_file else sys.stderr
        except OSError as exc:  # still drain the pipe, or the child blocks once it is full
            print(f"dovetail: cannot write the verifier's log to {self.log_file}: {exc}", file=sys.stderr)
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode(errors="replace")
                last_lines.append(line.rstrip())
                try:
                    if out is not None:
                        out.write(line)
                        out.flush()
                except (OSError, ValueError, AttributeError):  # our stderr went away: keep reading (never block the child)
                    pass
        finally:
            pipe.close()
            if self.log_file and out is not None:
                out.close()

    def death_report(self, lines: int = 8) -> str:
        """Why the child is gone, in words: the signal or exit code, its last log lines, what to try."""
        code = self.proc.poll()
        if code is None:
            return "the verifier process is running"
        self._relay.join(timeout=2.0)  # its last words are still in the pipe
        if code < 0:
            name = signal_name(-code)
            what = f"the verifier process died of {name} (signal {-code}): {_ADVICE.get(name, 'see its last lines')}"
        else:
            what = f"the verifier process exited with code {code}"
        tail = _last_words([l for l in list(self.last_lines) if l.strip()], lines)
        where = f" (whole log: {self.log_file})" if self.log_file else ""
        return what + (f"; its last lines{where}:\n    " + "\n    ".join(tail) if tail else "")

    def exited(self, wait_s: float = 2.0) -> bool:
        """Whether the child has exited, given the moments a dying one takes (its connection can close
        before the process is gone)."""
        try:
            self.proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def restart(self) -> str:
        """A new child with the same config (after this one died); its endpoint."""
        self.stop()
        self._spawn()
        return self.wait_ready().endpoint

    def wait_ready(self) -> "VerifierChild":
        """Block until the child listens (its endpoint and what it runs), or raise if it exited first."""
        with os.fdopen(self.ready_fd) as ready:
            self.endpoint = ready.readline().strip()
            line = ready.readline().strip()
        self.target = json.loads(line) if line else {}  # engine, weight format, file, the config it runs
        if not self.endpoint:
            self.proc.wait()
            raise RuntimeError(f"the verifier did not start: {self.death_report()}")
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

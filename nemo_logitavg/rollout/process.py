"""Start and stop rollout servers as child processes (used by the recipes; the launcher uses srun instead)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

TOKEN_ENV = "NEMO_LOGITAVG_ROLLOUT_TOKEN"  # the server reads its bearer token from here (not from its argv)


def _server_child_signals() -> None:
    """Runs in the server child before exec. The trainer blocks SIGTERM and SIGUSR1 (``StopRequested``) and a
    child inherits that mask: unblock SIGTERM so ``stop()`` (and Slurm's final SIGTERM) reach the server, which
    then stops its own workers; keep ignoring USR1 (Slurm's preemption warning is for the trainer, the server
    keeps serving while the trainer finishes its step). Reward workers and checkpoint writers keep the mask."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def port_is_free(host: str, port: int) -> bool:
    """True unless something listens on ``host:port`` (connections of a dead server in TIME_WAIT do not count:
    the server binds with SO_REUSEADDR too, so it can restart where it was)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m nemo_logitavg.rollout.server`` in a child process, with its log in ``log_path``.

    ``reference=None`` serves the policy alone (with ``ref_weight`` 0), loading one model instead of two.
    The server always requires a bearer token: ``token``, else a random one (``secrets.token_urlsafe``); it is
    ``self.token`` for the client and reaches the child through ``NEMO_LOGITAVG_ROLLOUT_TOKEN``, never its
    command line (which every user of the machine can read in ``ps``).

    Raises:
        RuntimeError: the port is already held (named), or the server exits or does not become healthy in time
            (the message carries the end of its log).
    """

    def __init__(
        self,
        policy: str,
        reference: str | None,
        ref_weight: float,
        log_path: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: list[str] | None = None,
        token: str | None = None,
        weights_root: str | None = None,
    ) -> None:
        port = free_port(host) if port is None else port
        if not port_is_free(host, port):
            raise RuntimeError(f"rollout server: port {host}:{port} is already in use; refusing to start")
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        self.token = token or secrets.token_urlsafe(32)
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        cmd = [sys.executable, "-m", "nemo_logitavg.rollout.server", "--policy", policy,
               "--ref-weight", str(ref_weight), "--host", host, "--port", str(port), *(extra_args or [])]  # fmt: skip
        if reference is not None:  # None: the policy alone (ref_weight must be 0)
            cmd += ["--reference", reference]
        if weights_root is not None:  # where /v1/load_weights may load from (else it is refused)
            cmd += ["--weights-root", weights_root]
        env = {**os.environ, TOKEN_ENV: self.token}
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_server_child_signals
        )

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(self.url + "/health", headers=self.auth_headers())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rollout server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    # Only our child counts: another process could hold the port we picked.
                    if response.status == 200 and json.loads(response.read()).get("pid") == self.proc.pid:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"rollout server at {self.url} not healthy after {timeout:.0f} s:\n{self._tail()}")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _tail(self, lines: int = 30) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

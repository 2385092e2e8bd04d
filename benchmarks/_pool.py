"""Launching configurations in fresh processes (see ``_worker.py``) from the driver."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_worker.py")

#: Allocator settings: glibc defaults, and one that keeps freed memory in the process.
ALLOCATORS = {
    "default": {},
    "no-trim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"},
}


def worker_env(allocator: str, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATORS[allocator])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


class Launcher:
    """Runs configurations, each in a fresh process, under one allocator setting.

    ``isolation="fork"`` forks each configuration from a zygote that has imported torch and
    the peers once; ``"spawn"`` starts a new interpreter per configuration.
    """

    def __init__(self, allocator: str, threads: int, isolation: str = "fork",
                 timeout_s: float = 900.0) -> None:
        self.env = worker_env(allocator, threads)
        self.isolation = isolation
        self.timeout_s = timeout_s
        self._zygote: subprocess.Popen | None = None
        self._tmp = tempfile.mkdtemp(prefix="camkit-bench-")
        self._count = 0

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Launcher:
        if self.isolation == "fork":
            self._zygote = subprocess.Popen(
                [sys.executable, WORKER, "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self.env,
                text=True,
            )
            self._buffer = b""
            message = self._read(self.timeout_s)
            if not message.get("ready"):
                raise RuntimeError(f"benchmark zygote failed to start: {message}")
        return self

    def __exit__(self, *exc) -> None:
        if self._zygote is not None:
            self._zygote.stdin.close()
            try:
                self._zygote.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
            self._zygote = None

    # ----------------------------------------------------------------- running
    def run(self, cfg: dict) -> dict:
        self._count += 1
        out = os.path.join(self._tmp, f"result-{self._count}.json")
        cfg = {**cfg, "out": out}
        if self.isolation == "fork":
            self._zygote.stdin.write(json.dumps(cfg) + "\n")
            self._zygote.stdin.flush()
            pid = self._read(60)["pid"]
            try:
                status = self._read(self.timeout_s)["done"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._read(60)
                return {**cfg, "ok": False, "error": f"timed out after {self.timeout_s} s"}
        else:
            try:
                status = subprocess.run(
                    [sys.executable, WORKER, "--config", json.dumps(cfg)],
                    env=self.env,
                    timeout=self.timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                return {**cfg, "ok": False, "error": f"timed out after {self.timeout_s} s"}
        if not os.path.exists(out):
            return {**cfg, "ok": False, "error": f"worker exited with status {status}"}
        with open(out) as handle:
            result = json.load(handle)
        os.remove(out)
        return result

    def _read(self, timeout: float) -> dict:
        """The zygote's next JSON line (read unbuffered, so select() sees every line)."""
        deadline = time.monotonic() + timeout
        fd = self._zygote.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("benchmark zygote exited unexpectedly")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

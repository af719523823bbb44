"""Worker processes for one machine: start N ``manage.py rqworker <queue>`` per queue,
restart any that dies, and stop them all gracefully (SIGTERM lets each finish its job)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds a worker gets to finish its job after SIGTERM before it is killed.
STOP_GRACE = 30.0


@dataclass
class WorkerProcess:
    """One supervised worker process."""

    queue: str
    index: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    last_start: float = field(default=0.0)


class WorkerSupervisor:
    """Keeps ``counts[queue]`` worker processes running for each queue."""

    def __init__(
        self,
        counts: dict[str, int],
        *,
        manage_py: Path,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.manage_py = manage_py
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = [
            WorkerProcess(queue, i, log_dir / f"worker-{queue}-{i}.log")
            for queue, count in counts.items()
            for i in range(count)
        ]
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Start every worker and a thread that restarts dead ones."""
        for worker in self.workers:
            self._spawn(worker)
        self._watcher = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, worker: WorkerProcess) -> None:
        with open(worker.log_path, "ab") as log:
            worker.process = subprocess.Popen(
                [sys.executable, str(self.manage_py), "rqworker", worker.queue],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not them
            )  # fmt: skip
        worker.last_start = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for worker in self.workers:
                process = worker.process
                if process is None or process.poll() is None or self._stopping.is_set():
                    continue
                # Back off a worker that keeps dying right after starting.
                if time.monotonic() - worker.last_start < min(30, 2**worker.restarts):
                    continue
                worker.restarts += 1
                logger.warning(
                    "worker %s-%s exited with %s; restarting (see %s)",
                    worker.queue, worker.index, process.returncode, worker.log_path,
                )  # fmt: skip
                self._spawn(worker)

    @property
    def alive(self) -> int:
        """How many worker processes are running."""
        return sum(1 for w in self.workers if w.process and w.process.poll() is None)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every worker, wait up to ``grace`` seconds, then SIGKILL what is left."""
        self._stopping.set()
        running = [w.process for w in self.workers if w.process and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._watcher is not None:
            self._watcher.join(timeout=2)

"""Stopping early without losing work: SIGTERM/SIGUSR1 (Slurm preemption, the time-limit signal) or a
stop file (created by slurm/torchrun.sh) ask the run to stop; the ranks agree on it between static
rounds or every Engine.SYNC_STEPS decode steps of continuous batching, rank 0 has flushed every record
finished in order by then, and a re-run resumes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FILE_CHECK_SECONDS = 1.0  # the stop file is looked for at most this often (the server asks every step)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on request; run again to finish


class StopRequest:
    """Set by a stop signal or by the file named in $GPTOSS_STOP_FILE; checked between batches."""

    def __init__(self, stop_file: str | None = None) -> None:
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled: int | None = None
        self._next_look = 0.0  # when the stop file is looked for next
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)

    @classmethod
    def from_env(cls) -> StopRequest:
        return cls(os.environ.get("GPTOSS_STOP_FILE"))

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signalled is not None:  # asked twice: do not wait for a long batch to end
            log.warning("%s received again: exiting now (the records of finished batches are written)",
                        signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("%s received: stopping at the next check (the end of the batch with static rounds, a few "
                    "decode steps with continuous batching; send it again to exit now)",
                    signal.Signals(signum).name)
        self.signalled = signum

    def __call__(self) -> bool:
        if self.signalled is not None:
            return True
        if self.stop_file is None or time.monotonic() < self._next_look:
            return False
        self._next_look = time.monotonic() + FILE_CHECK_SECONDS  # a shared filesystem: not on every step
        return self.stop_file.exists()

"""Helper processes (loader workers, tokenize's and prepare's pools) that end with the process
that started them, however it ends."""

from __future__ import annotations

import os
import select
import threading


def exit_with(owner: int) -> None:
    """End this process as soon as process `owner` ends, however it ends. Nothing else ends a
    helper whose owner was killed outright (the OOM killer, kill -9): a pool process waits for its
    next job forever; a loader worker is the forkserver's child, not the trainer's, and torch's
    workers watch only their parent (os.getppid), so they, the server and the resource tracker
    (which wait for them) all lived on. A daemon thread waits on the owner instead."""
    try:
        handle = os.pidfd_open(owner)  # readable once the process has ended
    except ProcessLookupError:  # it ended before this process started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): nothing to wait on
        return

    def wait_then_exit() -> None:
        select.select([handle], [], [])
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-owner", daemon=True).start()

"""The one process pool of the project: ordered results, a bounded window of tasks in flight, inline when serial.

Process workers, not threads: answer verification bounds math-verify with a signal alarm, which only works in a
process's main thread (:mod:`megatron_offgrpo.rewards.equivalence`). Workers are started with ``spawn`` so that they
do not inherit the parent's threads (torch, tokenizers) that ``fork`` would copy mid-state; they therefore pay their
imports once, which is why callers ship work in large chunks (many groups per task) and keep the worker modules
light.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, Optional, Sequence


class OrderedProcessPool:
    """Run ``fn(task)`` for each task in ``workers`` spawned processes and yield the results in task order.

    With ``workers <= 1`` everything runs inline in this process (``initializer`` too), so a serial run has no
    pool to start and exactly the same code path. At most ``max_in_flight`` tasks (default ``2 * workers``) are
    submitted ahead of the consumer: memory stays bounded by the window whatever the number of tasks, and a worker
    always has its next task queued. An exception raised by a task is re-raised by :meth:`imap` at that task's
    place. Use as a context manager; leaving it on an exception terminates the workers.
    """

    def __init__(
        self,
        workers: int,
        initializer: Optional[Callable[..., None]] = None,
        initargs: Sequence[Any] = (),
        max_in_flight: Optional[int] = None,
    ) -> None:
        self.workers = max(1, int(workers))
        self.max_in_flight = max(1, max_in_flight or 2 * self.workers)
        self._pool = None
        if self.workers > 1:
            self._pool = mp.get_context("spawn").Pool(self.workers, initializer=initializer, initargs=tuple(initargs))
        elif initializer is not None:
            initializer(*initargs)

    def imap(self, fn: Callable[[Any], Any], tasks: Iterable[Any], caller_helps: bool = False) -> Iterator[Any]:
        """``fn(task)`` for each task, in order (``fn`` must be a module-level function: it is pickled by name).

        With ``caller_helps``, this process runs the next task itself whenever the oldest one is not done yet
        (workers still starting, or the caller has nothing else to do), instead of waiting; at most another
        ``max_in_flight`` results computed that way wait for their turn.
        """
        if self._pool is None:
            for task in tasks:
                yield fn(task)
            return
        pending: Deque[Any] = deque()  # AsyncResult, or a one-element list holding a result computed here
        it = iter(tasks)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.max_in_flight:
                try:
                    pending.append(self._pool.apply_async(fn, (next(it),)))
                except StopIteration:
                    exhausted = True
            if not pending:
                return
            head = pending[0]
            if (caller_helps and not exhausted and not isinstance(head, list) and not head.ready()
                    and len(pending) < 2 * self.max_in_flight):
                try:
                    pending.append([fn(next(it))])
                except StopIteration:
                    exhausted = True
                continue
            done = pending.popleft()
            yield done[0] if isinstance(done, list) else done.get()

    def close(self) -> None:
        """Wait for the workers to finish and stop them."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def terminate(self) -> None:
        """Stop the workers now (an error or an interrupt in the consumer)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "OrderedProcessPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

"""One command as several processes: torch.distributed, launched by torchrun.

torchrun starts N copies of a command with RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous in
their environment; World.join makes them one process group (gloo for CPU tensors, NCCL for
CUDA tensors when the ranks have GPUs) and is a one-process World without them, whose
methods then do nothing. experiment.py shares out whole (configuration, class) jobs; in
`--distribute images` trainer.py shares out one class's images and uses World's collectives.

Every wait between ranks goes through PeerWatch, a heartbeat on its own gloo group that
gathers each rank's progress and finished result rows every second. So a rank may work on a
long class while the others wait, without tripping the process-group timeout, and a rank
that dies or hangs is noticed within --dist_timeout_s: the others stop with one error line.
Collectives on the main group run only once every rank has arrived, so its timeout (the
same) only fires when a rank is lost.
"""

from __future__ import annotations

import _thread
import logging
import os
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from utils.cli import first_line

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0


class PeerLost(Exception):
    """Another rank stopped answering: killed, out of memory, or its machine lost."""


def lost_peer_message(rank: int, err: Exception) -> str:
    """Why a rank stops when a collective with the others failed (the run adds what it kept)."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ")[0]  # gloo prefixes its file and line
    return (
        f"rank {rank}: another rank stopped answering (killed, out of memory or its machine lost?): {reason}; stopping"
    )


class PeerWatch:
    """A background thread that all-gathers (steps reached, done, new items) of every rank each
    heartbeat; rank 0 hands the other ranks' items to `deliver`.

    `arrive` waits until every rank has reached the same step (a barrier without a timeout as
    long as every rank is alive), `finish` until every rank is done. A failed heartbeat
    records why, is logged once, and stops the main thread (PeerLost where it waits, an
    interrupt where it works).
    """

    def __init__(self, rank: int, size: int, timeout: timedelta, deliver: Callable[[Any], None]):
        self.rank, self.size, self.deliver = rank, size, deliver
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.state = threading.Condition()
        self.step, self.done, self.outbox = 0, False, []
        self.reached, self.all_done, self.failure, self.waiting, self.kicked = 0, False, None, False, False
        self.thread = threading.Thread(target=self._beat, name="padim-peer-watch", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while True:
            with self.state:
                news, self.outbox = (self.step, self.done, self.outbox), []
            heard: list = [None] * self.size
            try:
                dist.all_gather_object(heard, news, group=self.group)
            except RuntimeError as err:  # torch.distributed's errors (DistBackendError, ...) are RuntimeErrors
                self._fail(lost_peer_message(self.rank, err))
                return
            if self.rank == 0:
                try:
                    for _, _, items in heard[1:]:
                        for item in items:
                            self.deliver(item)
                except Exception as err:  # escaping, it would end this thread silently and leave rank 0 waiting
                    self._fail(f"rank 0 could not record another rank's result: {err}; stopping")
                    return
            with self.state:
                self.reached = min(step for step, _, _ in heard)
                self.all_done = all(done for _, done, _ in heard)
                self.state.notify_all()
                if self.all_done:
                    return
                self.state.wait_for(lambda: self.kicked, timeout=HEARTBEAT_SECONDS)
                self.kicked = False

    def _fail(self, message: str) -> None:
        """Record why the heartbeat ended and stop the main thread, which says why (World.lost_peer_reason) with
        what the run kept: known only once it has stopped."""
        with self.state:
            self.failure = message
            waiting = self.waiting
            self.state.notify_all()
        if not waiting:
            _thread.interrupt_main()

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self.state:
            self.waiting = True
            try:
                while not ready():
                    if self.failure:
                        raise PeerLost(self.failure)
                    self.state.wait(timeout=HEARTBEAT_SECONDS)
            finally:
                self.waiting = False

    def post(self, item: Any) -> None:
        with self.state:
            self.outbox.append(item)

    def arrive(self) -> None:
        with self.state:
            self.step += 1
            target = self.step
            self._kick()
        self._wait(lambda: self.reached >= target)

    def finish(self) -> None:
        with self.state:
            self.done = True
            self._kick()
        self._wait(lambda: self.all_done)

    def _kick(self) -> None:
        """Beat now rather than at the next second (the caller holds `state`): a barrier costs no idle wait."""
        self.kicked = True
        self.state.notify_all()


class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun).

    `deliver` receives every item `post`ed by any rank, on rank 0 (from its own thread or the
    heartbeat's, so it must be thread-safe).
    """

    def __init__(self, deliver: Callable[[Any], None] | None = None, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.deliver, self.rank, self.size, self.local_rank = deliver, rank, size, local_rank
        self.watch: PeerWatch | None = None
        self.objects = None

    @classmethod
    def join(cls, deliver: Callable[[Any], None], timeout_s: float, cuda: bool) -> World:
        """The World torchrun's environment describes: one process group, CUDA device LOCAL_RANK when `cuda`."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(deliver)
        timeout = timedelta(seconds=timeout_s)
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
        world = cls(deliver, dist.get_rank(), dist.get_world_size(), local_rank)
        world.objects = dist.new_group(backend="gloo", timeout=timeout)  # pickled objects, main thread only
        world.watch = PeerWatch(world.rank, world.size, timeout, deliver)
        return world

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def lost_peer(self) -> bool:
        """Whether the heartbeat found another rank gone (it interrupted this rank's work)."""
        return self.lost_peer_reason is not None

    @property
    def lost_peer_reason(self) -> str | None:
        """Why the heartbeat stopped this rank, None while it has not."""
        return None if self.watch is None else self.watch.failure

    def close(self) -> None:
        """Wait until every rank is done, then leave the process group (after an error a process just
        exits, and the others notice it lost)."""
        if self.watch is not None:
            self.watch.finish()
            dist.destroy_process_group()

    def post(self, item: Any) -> None:
        """Send a result to rank 0's `deliver`."""
        if self.watch is None or self.is_root:
            self.deliver(item)
        else:
            self.watch.post(item)

    def part(self, items: list) -> list:
        """This rank's contiguous share of `items`; in rank order the shares are `items` again."""
        return items[len(items) * self.rank // self.size : len(items) * (self.rank + 1) // self.size]

    def everyone(self, item: Any) -> list:
        """Every rank's `item`, in rank order, on every rank."""
        if self.watch is None:
            return [item]
        self.watch.arrive()
        heard: list = [None] * self.size
        dist.all_gather_object(heard, item, group=self.objects)
        return heard

    def to_root(self, item: Any) -> list | None:
        """Every rank's `item`, in rank order, on rank 0; None on the others."""
        if self.watch is None:
            return [item]
        self.watch.arrive()
        heard = [None] * self.size if self.is_root else None
        dist.gather_object(item, heard, dst=0, group=self.objects)
        return heard

    def from_root(self, item: Any) -> Any:
        """Rank 0's `item` on every rank."""
        if self.watch is None:
            return item
        self.watch.arrive()
        box = [item]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def agree(self, error: Exception | None) -> None:
        """Raise the first rank's error on every rank, so that all stop where one must."""
        errors = [error] if self.watch is None else self.everyone(error)
        first = next((err for err in errors if err is not None), None)
        if first is not None:
            if self.watch is not None:
                self.watch.finish()  # every rank stops here: none is left waiting for a lost peer
            raise first

    def broadcast_(self, tensor: torch.Tensor, source: int) -> None:
        """Rank `source`'s tensor, in place, on every rank."""
        if self.watch is not None:
            self.watch.arrive()
            dist.broadcast(tensor, src=source)

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """The sum of every rank's tensor, in place, on every rank."""
        if self.watch is not None:
            self.watch.arrive()
            dist.all_reduce(tensor)

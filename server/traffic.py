"""Byte counts of what the coordinator sends to and receives from each node."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.grid import Grid


def message_bytes(message: Message) -> int:
    """Serialized size of a message's content (what travels, without transport framing)."""
    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


PULL_SECONDS = 0.5  # between pulls for replies (a grid with its own pull_interval, the simulation's, keeps it)


class TrafficMeter(Grid):
    """A Grid that forwards everything to the real one and counts bytes per node.

    It waits for replies itself: Flower 1.41's deployment grid pulls every 3 s, so each of a round's
    five exchanges (can-train, then the four SecAgg+ stages) ended up to 3 s after its last reply came.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = defaultdict(int)  # coordinator -> node
        self.up: dict[int, int] = defaultdict(int)  # node -> coordinator

    def reset(self) -> None:
        self.down.clear()
        self.up.clear()

    def _count_out(self, messages: list[Message]) -> None:
        for m in messages:
            self.down[m.metadata.dst_node_id] += message_bytes(m)

    def _count_in(self, messages: list[Message]) -> list[Message]:
        for m in messages:
            self.up[m.metadata.src_node_id] += message_bytes(m)
        return messages

    # -- Grid interface, forwarded
    def set_run(self, run_id):  # type: ignore[override]
        return self._grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[override]
        return self._grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[override]
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_out(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_in(list(self._grid.pull_messages(message_ids)))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or `timeout` passed (None: no limit), as Flower's
        grids do, every PULL_SECONDS."""
        pending = set(self.push_messages(messages))
        interval = getattr(self._grid, "pull_interval", PULL_SECONDS)
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending:
                break
            time.sleep(interval)
        return replies

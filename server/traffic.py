"""Byte counts of what the coordinator sends to and receives from each node."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.grid import Grid


def message_bytes(message: Message) -> int:
    """Serialized size of a message's content (what travels, without transport framing)."""
    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


class TrafficMeter(Grid):
    """A Grid that forwards everything to the real one and counts bytes per node."""

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
        messages = list(messages)
        self._count_out(messages)
        return self._count_in(list(self._grid.send_and_receive(messages, timeout=timeout)))

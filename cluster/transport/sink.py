"""The grader-side sink: built inside each grader actor, it pushes the kept groups onto the run's stream."""

from __future__ import annotations

import logging
from typing import Any, Callable

from cluster.types import ScoredGroup

log = logging.getLogger("forkrl")


class QueueSink:
    """A picklable factory (the address and queue config as plain dicts) of the grader's push function."""

    def __init__(self, address: dict[str, Any], queue_cfg: dict[str, Any]):
        self.address, self.queue_cfg = address, queue_cfg

    def __call__(self) -> Callable[[list[ScoredGroup]], None]:
        from cluster.config import QueueConfig
        from cluster.transport.codec import CodecError
        from cluster.transport.queue import Producer, QueueAddress

        producer = Producer(QueueAddress(**self.address), QueueConfig.model_validate(self.queue_cfg))

        def push(groups: list[ScoredGroup]) -> None:
            for g in groups:
                try:
                    producer.put(g)
                except CodecError as e:  # e.g. undecodable text: drop this group, keep the run going
                    log.error("group %s cannot be encoded and is dropped: %s", g.group_id, e)
        return push

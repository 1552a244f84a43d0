"""Taking a job or a result off JetStream: one rule for what cannot be read."""

from __future__ import annotations

import logging
from typing import TypeVar

from kurrier.core.message import WireMessage
from nats.aio.msg import Msg
from pydantic import ValidationError

Wire = TypeVar("Wire", bound=WireMessage)


async def read_wire(
    message: Msg, model: type[Wire], log: logging.Logger, what: str, come_back_in: float
) -> Wire | None:
    """The message as model; None once it is settled because it cannot be handled here.

    An unreadable one is terminated: it would fail the same way on every
    redelivery and block nothing else meanwhile, so one error line is all it
    gets. One in a newer format (a rolling upgrade) is given back after
    come_back_in seconds, for a pod that reads it.
    """
    try:
        parsed = model.model_validate_json(message.data)
    except ValidationError as error:
        log.error("discarding an unreadable %s: %s", what, error)
        await message.term()
        return None
    if not parsed.understood:
        log.warning(
            "%s in format version %d, newer than this pod's; left for an up-to-date pod",
            what,
            parsed.version,
            extra={"queue_id": getattr(parsed, "queue_id", None)},
        )
        await message.nak(delay=come_back_in)
        return None
    return parsed

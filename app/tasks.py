"""Ending a background task for certain: cancelled again until it has ended.

One cancellation is not always enough. aiokafka's ``Fetcher.close()`` (run by
``AIOKafkaConsumer.stop()``, and when Ferry puts its own fetcher in place) awaits the old fetch
task inside ``contextlib.suppress(CancelledError)``: a cancellation of the task calling it that
arrives right then is swallowed, and the task goes on as if nothing had happened. The API's
read model, cancelled at that moment of its start, then ran on, and the API's shutdown waited
for it for ever.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# How long a cancelled task is given to end before it is cancelled again.
RECANCEL_AFTER_SECONDS = 0.5


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and return once it has ended, however it ends (its error is logged)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_AFTER_SECONDS)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r while being stopped", task.get_name(), task.exception())

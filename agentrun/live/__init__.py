"""Waiting on the event loop: SSE streams and `wait=` long-polls hold no thread and no database
connection while they wait.

The server (`agentrun.asgi`) runs Django's views in threads. A view that would wait returns a
*plan* instead of blocking: a `LongPoll` or a `Stream`, both responses Django's middleware
treats like any other. The loop then carries the plan out. It parks the request on topics of
the process's one LISTEN connection (`LiveHub`); a notification bumps a topic's generation and
wakes its waiters; each runs its next look in a small thread pool, shared by every waiter that
asks the same question since that notification (a thousand followers of one run cost one
query and one rendering), and writes the answer.

Topics are subscribed *before* the look they guard, and a look counts only if it began after
the notification a waiter woke for (a notification is sent at commit), so nothing committed is
missed. When the LISTEN connection drops, every waiter looks again once it is back, and while
it is down they look every `DEGRADED_POLL_SECONDS`.

Under a plain WSGI server (Django's test client, `runserver`) the same plans run in the request's
thread and wait on `agentrun.notify`'s thread hub.
"""

from agentrun.live.hub import (
    DEGRADED_POLL_SECONDS,
    ENVIRON_KEY,
    LISTENER_NAME,
    Answer,
    LiveHub,
    Message,
    Receive,
    Send,
    Subscription,
    closed_on_purpose,
)
from agentrun.live.plans import (
    KEEPALIVE,
    SSE_CONTENT_TYPE,
    Feed,
    LongPoll,
    Look,
    Plan,
    Serving,
    Stream,
    long_poll,
    sse_frame,
    stream,
    stream_head,
)

__all__ = [
    "DEGRADED_POLL_SECONDS",
    "ENVIRON_KEY",
    "KEEPALIVE",
    "LISTENER_NAME",
    "SSE_CONTENT_TYPE",
    "Answer",
    "Feed",
    "LiveHub",
    "LongPoll",
    "Look",
    "Message",
    "Plan",
    "Receive",
    "Send",
    "Serving",
    "Stream",
    "Subscription",
    "closed_on_purpose",
    "long_poll",
    "sse_frame",
    "stream",
    "stream_head",
]

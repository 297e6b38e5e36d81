"""What SSE streams read (agentrun.live feeds): a run's events, and a session's output across its
runs. Each frame's `id` is the event's cursor: its seq on a run stream, `runId:seq` on a session
stream; `event` is its type and `data` the event as the list routes render it."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable

from django.conf import settings

from agentrun import notify
from agentrun.live import Feed, Look, sse_frame
from runs import selectors
from runs.serializers import EventOut

VIEWS: dict[str, Callable[..., list]] = {
    "trace": selectors.event_list,
    "output": selectors.output_event_list,
    "control": selectors.control_event_list,
}


def _frame(event, event_id: str) -> bytes:
    data = json.dumps(EventOut().to_representation(event), ensure_ascii=False, separators=(",", ":"))
    return sse_frame(event_id, event.type, data.encode())


class RunFeed(Feed):
    """A run's events of one view, from a seq; done once `terminal_status` is sent. A stream that
    starts past the end of a finished run is over before it starts (`over`)."""

    def __init__(self, run_id: str, view: str) -> None:
        self.run_id, self.view = run_id, view
        self._topics = (notify.run_topic(run_id),)

    def topics(self, position: Hashable) -> tuple[str, ...]:
        return self._topics

    def share_key(self, position: Hashable) -> Hashable:
        return ("run", self.run_id, self.view, position)

    def cursor(self, position: Hashable) -> str | None:
        return str(position)

    def read(self, position: Hashable) -> Look:
        seq = int(position)  # type: ignore[call-overload]  # positions here are seqs
        page = int(settings.AGENTRUN_STREAM_PAGE)
        events = VIEWS[self.view](run_id=self.run_id, after_seq=seq, limit=page)
        frames, done = [], False
        for event in events:
            frames.append(_frame(event, str(event.seq)))
            seq = event.seq
            if event.type == "terminal_status":
                done = True
                break
        more = not done and len(events) == page
        return Look(b"".join(frames), seq, done, more, self._topics)

    def over(self, position: Hashable) -> bool:
        seq = int(position)  # type: ignore[call-overload]  # positions here are seqs
        # Ended first, then nothing after: the run's end commits with its last events.
        return selectors.run_ended(run_id=self.run_id) and not VIEWS[self.view](
            run_id=self.run_id, after_seq=seq, limit=1
        )


class SessionFeed(Feed):
    """A session's output events, run after run: from a position (run id or None, seq), through
    the run's `terminal_status`, then on to the session's next run as it is created. Never done."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._session_topic = notify.session_topic(session_id)

    def topics(self, position: Hashable) -> tuple[str, ...]:
        run_id: str | None = position[0]  # type: ignore[index]  # positions here are (run id, seq)
        return (self._session_topic, notify.run_topic(run_id)) if run_id else (self._session_topic,)

    def share_key(self, position: Hashable) -> Hashable:
        return ("session", self.session_id, position)

    def cursor(self, position: Hashable) -> str | None:
        run_id: str | None = position[0]  # type: ignore[index]  # positions here are (run id, seq)
        return f"{run_id}:{position[1]}" if run_id else None  # type: ignore[index]  # as above

    def read(self, position: Hashable) -> Look:
        run_id: str | None = position[0]  # type: ignore[index]  # positions here are (run id, seq)
        seq: int = position[1]  # type: ignore[index]  # positions here are (run id, seq)
        page = int(settings.AGENTRUN_STREAM_PAGE)
        frames: list[bytes] = []
        while len(frames) < page:
            if run_id is None:
                run_id, seq = selectors.session_next_run_id(session_id=self.session_id, after_run_id=None), 0
                if run_id is None:
                    break
            # Ended before the read: then the read sees all of the run (its end commits with them).
            ended_before = selectors.run_ended(run_id=run_id)
            events = selectors.output_event_list(run_id=run_id, after_seq=seq, limit=page - len(frames))
            ended = False
            for event in events:
                frames.append(_frame(event, f"{run_id}:{event.seq}"))
                seq = event.seq
                if event.type == "terminal_status":
                    ended = True
                    break
            if not ended and (events or not ended_before):
                break
            following = selectors.session_next_run_id(session_id=self.session_id, after_run_id=run_id)
            if following is None:
                break
            run_id, seq = following, 0
        position = (run_id, seq)
        return Look(b"".join(frames), position, False, len(frames) >= page, self.topics(position))

"""Agent sessions (app label `agent_sessions`): the session record a run attaches to, its read
cursors and inbox, its trace and output views, and its PVC storage (reported by runners, evicted
and collected by gc_sessions). Imports only the foundations."""

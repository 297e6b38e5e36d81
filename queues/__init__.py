"""Queue tasks and their attempts: the queue of work that becomes runs, with per-queue and
per-tenant limits, the dispatcher that turns a pending task into a run and settles its attempt,
stats and the commander view. Imports the foundations, sessions and runs."""

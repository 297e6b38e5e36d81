"""Runs and everything a run owns: its commands (turns, steers), its event log, the runners
that claim it under a lease and their runner jobs, and the worker's launcher, reaper and
reconciler passes over them. Imports the foundations and sessions."""

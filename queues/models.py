"""Queue tasks (the queue issue fills this app)."""

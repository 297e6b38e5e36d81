"""The foundations every app shares, importing no app: errors and their envelope, API keys and
scopes, ids, the event and command vocabulary, backend profiles, JSON parsing and the wire's
text rules, redaction, transactions, notifications and long-polls, health, the Kubernetes
adapter and the launchers, and the middleware. The apps build on it: sessions <- runs <- queues,
with settings/ (the URL conf and the worker's wiring) on top."""

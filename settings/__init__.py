"""The top of the house: Django settings per environment (base, dev, test, prod), the URL conf
(urls.py) and the worker's wiring (worker.py). It may import every app; no app imports it."""

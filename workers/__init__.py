"""The Celery side: projection catch-up, imports and rebuilds, run by workers on Redis."""

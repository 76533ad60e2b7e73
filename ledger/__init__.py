"""The domain: customers, loans, the lending policy and the commands that change them.

Nothing here knows about HTTP, SQL or Celery; it runs on eventsourcing's in-memory
store in unit tests and on PostgreSQL in production.
"""

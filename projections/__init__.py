"""The read side: read-model tables in PostgreSQL, fed from the event store's notification log."""

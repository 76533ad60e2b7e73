"""Wiring: configuration, PostgreSQL, throwaway local services and the command line."""

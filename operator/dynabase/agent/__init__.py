"""Agents that run beside a server and converge it locally (PgBouncer)."""

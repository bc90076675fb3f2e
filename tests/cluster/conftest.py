"""Several-host tests: a real PostgreSQL server per session, a fresh database per test."""

from tests.pgserver import pg_server, pg_url  # noqa: F401

"""Unit-test fixtures: the PostgreSQL test server, for the tests that run on both backends."""

from tests.pgserver import pg_server, pg_url  # noqa: F401

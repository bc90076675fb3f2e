"""Several-host tests: a real PostgreSQL server per session, a fresh database per test."""

from tests.integration.conftest import reference_output  # noqa: F401 - for the real-worker tests
from tests.pgserver import pg_server, pg_url  # noqa: F401

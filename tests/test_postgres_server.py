"""The test PostgreSQL itself (tests/helpers/pg_server.py): real logins, rights and crashes."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers.pg_server import READ_ONLY, PgServer


def test_a_fresh_database_per_test_over_tcp_with_a_password(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), inet_server_addr()::text,"
            " current_setting('fsync')"
        ).fetchone()
    assert row is not None
    user, database, address, fsync = row
    assert user == "campaign" and database.startswith("t_")
    assert address.startswith("127.0.0.1") and fsync == "on"


def test_a_wrong_password_is_refused(pg_server: PgServer) -> None:
    wrong = pg_server.url().replace(pg_server.passwords["campaign"], "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_the_read_only_role_cannot_create_tables(pg_server: PgServer, pg_url: str) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url(dbname, user=READ_ONLY), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE t (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE SCHEMA s")


def test_committed_rows_survive_an_immediate_stop(pg_server: PgServer, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept SELECT generate_series(1, 1000)")
        pg_server.stop_immediate()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    pg_server.start()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1000,)

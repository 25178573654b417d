"""Vault's database secrets engine in front of PostgreSQL, set up as the README tells an
operator to: an admin user that may create users and end their sessions, and nothing more
(no superuser); a group role that holds the catalog's table rights; a dynamic role whose
users join that group, and whose revocation ends their sessions before dropping them.
Used by the tests and the dev stack."""

from __future__ import annotations

from dataclasses import dataclass

import hvac
import psycopg
from psycopg import sql

from catalog.database import POSTGRES_SCHEMA

ADMIN_USER = "secretbroker_admin"
"""The engine's own PostgreSQL user: CREATEROLE, pg_signal_backend, admin of APP_GROUP."""
APP_GROUP = "catalog_app"
"""Holds the catalog's rights on its tables; every issued user is a member (IN ROLE)."""

CREATION_STATEMENTS = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}'"
    " VALID UNTIL '{{expiration}}' IN ROLE " + APP_GROUP + ";"
]
REVOCATION_STATEMENTS = [
    # End the user's sessions first: a dropped user's open connections live on, failing every
    # table query (pg_signal_backend lets a non-superuser do this).
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'DROP ROLE IF EXISTS "{{name}}";',
]


@dataclass(frozen=True)
class DatabaseEngineSetup:
    mount: str
    role: str
    host: str
    port: int
    database: str

    @property
    def static_role(self) -> str:
        """The name of the static role create_static_role writes."""
        return f"{self.role}-static"

    def url_template(self) -> str:
        """The broker's ``[secrets.NAME.database] url`` for this database."""
        return f"postgresql://{{username}}:{{password}}@{self.host}:{self.port}/{self.database}"


def prepare_postgres(superuser_url: str, admin_password: str) -> None:
    """The catalog's schema, its group role with the table rights, and the engine's admin."""
    with psycopg.connect(superuser_url, autocommit=True) as db:
        db.execute(POSTGRES_SCHEMA)
        db.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(APP_GROUP)))
        db.execute(
            sql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
            ).format(sql.Identifier(APP_GROUP))
        )
        db.execute(
            sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(
                sql.Identifier(APP_GROUP)
            )
        )
        db.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                sql.Identifier(ADMIN_USER), sql.Literal(admin_password)
            )
        )
        for grant in (
            sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(
                sql.Identifier(APP_GROUP), sql.Identifier(ADMIN_USER)
            ),
            sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(ADMIN_USER)),
        ):
            db.execute(grant)


def create_static_user(superuser_url: str, user: str, password: str) -> None:
    """A fixed login user in APP_GROUP: what a rollback to environment variables serves."""
    with psycopg.connect(superuser_url, autocommit=True) as db:
        db.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(user), sql.Literal(password), sql.Identifier(APP_GROUP)
            )
        )


def configure_engine(
    admin: hvac.Client,
    setup: DatabaseEngineSetup,
    admin_password: str,
    *,
    default_ttl: str = "1h",
    max_ttl: str = "24h",
) -> None:
    """Mount the engine (once), connect it to PostgreSQL as ADMIN_USER, write the role."""
    if f"{setup.mount}/" not in admin.sys.list_mounted_secrets_engines()["data"]:
        admin.sys.enable_secrets_engine("database", path=setup.mount)
    connection = f"{setup.database}-connection"
    admin.secrets.database.configure(
        name=connection,
        plugin_name="postgresql-database-plugin",
        allowed_roles=[setup.role, setup.static_role],
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@{setup.host}:{setup.port}"
            f"/{setup.database}?sslmode=disable"
        ),
        username=ADMIN_USER,
        password=admin_password,
        password_authentication="scram-sha-256",  # noqa: S106 - a hashing method
        mount_point=setup.mount,
    )
    admin.secrets.database.create_role(
        setup.role,
        db_name=connection,
        creation_statements=CREATION_STATEMENTS,
        revocation_statements=REVOCATION_STATEMENTS,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        mount_point=setup.mount,
    )


def create_static_role(
    admin: hvac.Client, setup: DatabaseEngineSetup, user: str, rotation_period: int
) -> None:
    """A static role for ``user`` (an existing user, e.g. from create_static_user): the engine
    sets its password now, and again every ``rotation_period`` seconds (5 at least)."""
    admin.secrets.database.create_static_role(
        setup.static_role,
        db_name=f"{setup.database}-connection",
        username=user,
        rotation_statements=[],
        rotation_period=rotation_period,
        mount_point=setup.mount,
    )

"""Alembic environment for pyheadscale.

Used two ways:
- programmatically by pyheadscale.db.engine.migrate(), which hands over an open connection in
  config.attributes["connection"] (logging is left alone);
- from the alembic CLI in the repository root (see alembic.ini for choosing the database).
"""

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from pyheadscale.db.models import JSONText, NumericBool, UTCDateTime, metadata

config = context.config
target_metadata = metadata

# Tables other tools put into a Headscale SQLite file (litestream replication bookkeeping).
_FOREIGN_TABLE_PREFIXES = ("_litestream_", "sqlite_")


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if type_ == "table" and name and name.startswith(_FOREIGN_TABLE_PREFIXES):
        return False
    return True


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our column types as plain SQLAlchemy types, so migrations never import models."""
    if type_ != "type":
        return False
    if isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, NumericBool):
        return 'sa.Boolean().with_variant(sa.NUMERIC(), "sqlite")'
    if isinstance(obj, JSONText):
        return "sa.Text()"
    return False


def _configure_kwargs(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
        "include_object": include_object,
        "render_item": render_item,
    }


def _url() -> str:
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    url = (
        x_url
        or os.environ.get("PYHEADSCALE_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set PYHEADSCALE_DATABASE_URL")
    return url


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_kwargs(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_kwargs(url.split(":", 1)[0].split("+", 1)[0]),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = _url()
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # Relative SQLite paths are relative to the cwd; make sure the directory exists.
        os.makedirs(os.path.dirname(url[len("sqlite:///") :]) or ".", exist_ok=True)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""alembic's environment for the export records: run on the connection `records.migrate` hands in."""

from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=None,
                  version_table=config.get_main_option("version_table"),
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

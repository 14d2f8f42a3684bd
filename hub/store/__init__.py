"""Where the hub's truth lives: the database and everything that touches it as a whole.

``db`` makes engines (SQLite in WAL mode with write-locking transactions); ``schema`` is
every table; ``migrate`` runs Alembic; ``lock`` keeps a second hub off the same SQLite
file; ``reader`` runs read-only queries off the event loop; ``prepared`` caches the hot
path's compiled statements.
"""

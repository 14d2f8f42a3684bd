"""Alembic environment and versions: the only way kiri's schema changes."""

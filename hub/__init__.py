"""The hub: sole owner of the database, serving JSON-RPC over TCP."""

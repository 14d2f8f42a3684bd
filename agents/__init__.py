"""Agents: processes that lease work from the hub. They own nothing durable."""

"""The hub's HTTP face: JSON API, live dashboard, Prometheus metrics, health check."""

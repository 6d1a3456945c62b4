"""Prometheus metrics: what the workers observe and what the model host publishes, in one view."""

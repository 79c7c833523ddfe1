"""The Kafka broker Ferry runs against in development, tests and CI (see broker.py, locate.py)."""

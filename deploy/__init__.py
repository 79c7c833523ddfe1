"""Deployment helpers: the local Kafka broker, the local process supervisor, image and manifests."""

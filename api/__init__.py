"""Ferry's HTTP API (aiohttp): validates submits, publishes them to Kafka, answers polls."""

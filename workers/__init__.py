"""Ferry's workers: Faust agents that take jobs from Kafka and call the providers."""

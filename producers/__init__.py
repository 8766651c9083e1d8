"""Everything that writes into Kafka from outside: ingest API, simulator, replay, feed pollers."""

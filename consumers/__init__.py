"""Everything that reads out of Kafka to the world: Postgres sink, topic router, tail."""

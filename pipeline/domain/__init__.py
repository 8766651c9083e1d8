"""Pure domain logic: no Kafka, no Faust, no psycopg, no HTTP. Standard library, shapely, numpy,
geopy and schemas only (enforced by tests/unit/test_layering.py)."""

"""crisiswatch pipeline: the geofence engine (``pipeline.domain``), the Faust app and agents,
settings, topics, metrics and the embedded stack."""

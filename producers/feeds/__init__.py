"""Feed producers: fetch (I/O) -> parse (pure, ``pipeline.domain.feeds``) -> publish.

``crisiswatch parse`` (:mod:`producers.feeds.parse_cmd`) runs the pure parsers on files;
``crisiswatch feeds`` (:mod:`producers.feeds.poll_cmd`) polls the configured feeds and publishes;
:mod:`producers.feeds.geocoding` provides the geocoder the news parser locates places with.
"""

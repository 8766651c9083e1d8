"""Pure feed parsers: documents in, ``crisis/1`` events out. See :mod:`pipeline.domain.feeds.base`."""

from pipeline.domain.feeds.base import FORMATS, FeedError, ParseContext, ParseResult, Rejection, parse_document

__all__ = ["FORMATS", "FeedError", "ParseContext", "ParseResult", "Rejection", "parse_document"]

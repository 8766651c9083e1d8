"""Which parser a document needs, judged from its content alone (``--format auto``).

Rules, first match wins:

- JSON (after an optional BOM and whitespace, the text starts with ``{`` or ``[``):
  - a GeoJSON ``FeatureCollection`` whose features carry earthquake properties (``mag``) or whose
    ``metadata.url`` is on earthquake.usgs.gov -> ``usgs``;
  - an object with a ``data`` map of countries carrying ``advisory-state`` (Global Affairs Canada),
    or with an ``advisories`` list, or a list of objects with a country and a level -> ``advisory``.
- CSV: a first line naming a ``country`` column and a ``level`` / ``advisory`` column -> ``advisory``.
- XML (read through :mod:`pipeline.domain.feeds.xmlsafe`, so hostile documents are refused here too):
  - root ``alert`` (any CAP namespace) or an EDXL-DE ``EDXLDistribution`` -> ``cap``;
  - an RSS or Atom feed using the GDACS namespace -> ``gdacs``;
  - an Atom or RSS feed with inline elements in a CAP namespace -> ``cap``;
  - any other RSS 2.0, RSS 1.0 (RDF) or Atom feed -> ``rss``.
- Anything else is refused with :class:`FeedError`.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.domain.feeds import xmlsafe
from pipeline.domain.feeds.base import FeedError

GDACS_NAMESPACE = "http://www.gdacs.org"
CAP_NAMESPACE_PREFIX = "urn:oasis:names:tc:emergency:cap:"
EDXL_DE_PREFIX = "urn:oasis:names:tc:emergency:EDXL:DE"
_FEED_ROOTS = {"rss", "feed", "RDF"}


def _json_format(document: Any) -> str | None:
    if isinstance(document, dict):
        if document.get("type") == "FeatureCollection" and isinstance(document.get("features"), list):
            metadata = document.get("metadata")
            url = metadata.get("url", "") if isinstance(metadata, dict) else ""
            features = document["features"]
            has_mag = any(isinstance(f, dict) and isinstance(f.get("properties"), dict) and "mag" in f["properties"]
                          for f in features[:20])
            if has_mag or (isinstance(url, str) and "earthquake.usgs.gov" in url):
                return "usgs"
            return None
        data = document.get("data")
        if isinstance(data, dict) and any(isinstance(v, dict) and "advisory-state" in v for v in data.values()):
            return "advisory"
        if isinstance(document.get("advisories"), list):
            return "advisory"
    if isinstance(document, list) and document and all(isinstance(i, dict) for i in document[:20]):
        keys = {k.lower() for i in document[:20] for k in i}
        if keys & {"country", "iso2", "country_code"} and keys & {"level", "advisory_level", "advisory-state"}:
            return "advisory"
    return None


def _csv_format(first_line: str) -> str | None:
    columns = {c.strip().strip('"').lower() for c in first_line.split(",")}
    if columns & {"country", "iso2", "country_code"} and columns & {"level", "advisory_level", "advisory"}:
        return "advisory"
    return None


def _xml_format(data: bytes) -> str | None:
    root = xmlsafe.parse_xml(data)
    name, ns = xmlsafe.local_name(root.tag), xmlsafe.namespace(root.tag)
    if name == "alert" and (ns.startswith(CAP_NAMESPACE_PREFIX) or not ns):
        return "cap"
    if name == "EDXLDistribution" and ns.startswith(EDXL_DE_PREFIX):
        return "cap"
    if name not in _FEED_ROOTS:
        return None
    namespaces = {xmlsafe.namespace(e.tag) for e in root.iter()}
    if any(n.rstrip("/") == GDACS_NAMESPACE for n in namespaces):
        return "gdacs"
    if any(n.startswith(CAP_NAMESPACE_PREFIX) for n in namespaces):
        return "cap"
    return "rss"


def detect_format(data: bytes) -> str:
    """``cap``, ``gdacs``, ``usgs``, ``rss`` or ``advisory``; :class:`FeedError` when none fits."""
    body = xmlsafe.strip_bom(data).lstrip()
    if not body:
        raise FeedError("cannot detect the format of an empty document")
    fmt: str | None
    if body[:1] in (b"{", b"["):
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FeedError(f"looks like JSON but is not: {exc}") from None
        fmt = _json_format(document)
    elif body[:1] == b"<":
        fmt = _xml_format(body)
    else:
        first_line = body.split(b"\n", 1)[0].decode("utf-8", "replace")
        fmt = _csv_format(first_line)
    if fmt is None:
        raise FeedError("unknown document format (not CAP, GDACS, USGS GeoJSON, RSS/Atom or a travel-advisory list)")
    return fmt

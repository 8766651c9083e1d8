"""The one way feed parsers read XML: hardened, bounded, with a clear reason when it refuses.

Feeds are untrusted. Every XML document goes through :func:`parse_xml`, which

- strips a UTF-8 byte-order mark (GDACS serves one);
- refuses documents larger than ``max_bytes`` before reading them;
- parses with defusedxml's expat parser with DTDs, entity declarations and external references
  all forbidden. A ``<!DOCTYPE`` stops the parse as soon as expat reaches it, so entity-expansion
  bombs (billion laughs, quadratic blowup), external entities (``file://``, ``http://``) and external
  DTD retrieval are refused before a single entity is declared, let alone expanded or fetched;
  the reason names the attack when the document type declaration shows it;
- feeds the parser in chunks and stops when ``max_seconds`` of parse time are spent;
- counts elements and nesting depth while building the tree, so a flood of tiny elements or a
  pathologically deep document is refused with bounded memory (and without the recursion errors a
  deep tree would cause in later tree walks).

It also offers small namespace-agnostic helpers: CAP 1.1 and 1.2, Atom-inline ``cap:`` elements and
EDXL-DE envelopes name the same things in different namespaces, and parsers match on local names.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import DefusedXMLParser

from pipeline.domain.feeds.base import FeedError

UTF8_BOM = b"\xef\xbb\xbf"
MAX_BYTES = 10_000_000
MAX_SECONDS = 5.0
MAX_ELEMENTS = 250_000
MAX_DEPTH = 64
CHUNK_BYTES = 64 * 1024

# What a document type declaration reveals about the attack it carries (looked at only to word the reason).
_DOCTYPE_AT = re.compile(rb"<!DOCTYPE", re.IGNORECASE)
_EXTERNAL_ENTITY = re.compile(rb"<!ENTITY\s+%?\s*[^\s>]+\s+(SYSTEM|PUBLIC)\b", re.IGNORECASE)
_ENTITY = re.compile(rb"<!ENTITY\b", re.IGNORECASE)
_EXTERNAL_DTD = re.compile(rb"<!DOCTYPE\s+[^\s>\[]+\s+(SYSTEM|PUBLIC)\b", re.IGNORECASE)
_DOCTYPE_PEEK_BYTES = 64 * 1024


class _BoundedTreeBuilder(ET.TreeBuilder):
    """An ElementTree builder that refuses too many elements or too deep a nesting."""

    def __init__(self, max_elements: int, max_depth: int) -> None:
        super().__init__()
        self._max_elements = max_elements
        self._max_depth = max_depth
        self._elements = 0
        self._depth = 0

    def start(self, tag: Any, attrs: dict[Any, Any]) -> ET.Element:
        self._elements += 1
        self._depth += 1
        if self._elements > self._max_elements:
            raise FeedError(f"XML refused: more than {self._max_elements} elements")
        if self._depth > self._max_depth:
            raise FeedError(f"XML refused: elements nested deeper than {self._max_depth} levels")
        return super().start(tag, attrs)

    def end(self, tag: Any) -> ET.Element:
        self._depth -= 1
        return super().end(tag)


def _dtd_reason(data: bytes) -> str:
    start = _DOCTYPE_AT.search(data, 0, _DOCTYPE_PEEK_BYTES)
    declaration = data[start.start(): start.start() + _DOCTYPE_PEEK_BYTES] if start else b""
    if _EXTERNAL_ENTITY.search(declaration):
        return "XML refused: external entity declaration (XXE) in a DTD; DTDs are not allowed in feeds"
    if _ENTITY.search(declaration):
        return "XML refused: entity declarations in a DTD (entity-expansion attack); DTDs are not allowed in feeds"
    if _EXTERNAL_DTD.search(declaration):
        return "XML refused: document type refers to an external DTD; DTDs are not allowed in feeds"
    return "XML refused: document type declaration (DTD); DTDs are not allowed in feeds"


def strip_bom(data: bytes) -> bytes:
    return data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data


def parse_xml(data: bytes, *, max_bytes: int = MAX_BYTES, max_seconds: float = MAX_SECONDS,
              max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH,
              clock: Callable[[], float] = time.monotonic) -> ET.Element:
    """Parse untrusted XML bytes to the root element, or raise :class:`FeedError` with a one-line reason."""
    if len(data) > max_bytes:
        raise FeedError(f"XML refused: document of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    body = strip_bom(data)
    if not body.strip():
        raise FeedError("XML refused: empty document")
    parser = DefusedXMLParser(target=_BoundedTreeBuilder(max_elements, max_depth),
                              forbid_dtd=True, forbid_entities=True, forbid_external=True)
    deadline = clock() + max_seconds
    try:
        for offset in range(0, len(body), CHUNK_BYTES):
            parser.feed(body[offset: offset + CHUNK_BYTES])
            if clock() > deadline:
                raise FeedError(f"XML refused: parsing took longer than {max_seconds:g} s")
        root: ET.Element = parser.close()
    except DTDForbidden:
        raise FeedError(_dtd_reason(body)) from None
    except EntitiesForbidden:
        raise FeedError("XML refused: entity declaration (entity-expansion attack)") from None
    except ExternalReferenceForbidden:
        raise FeedError("XML refused: external reference (XXE)") from None
    except ET.ParseError as exc:
        raise FeedError(f"not well-formed XML: {exc}") from None
    except RecursionError:
        raise FeedError("XML refused: nesting too deep") from None
    return root


# ---- namespace-agnostic helpers ---------------------------------------------------------------


def local_name(tag: object) -> str:
    """``{urn:oasis:names:tc:emergency:cap:1.2}alert`` -> ``alert``; also ``cap:alert`` -> ``alert``."""
    if not isinstance(tag, str):  # comments and processing instructions
        return ""
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def namespace(tag: object) -> str:
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else ""


def children(element: ET.Element, name: str) -> list[ET.Element]:
    """Direct children whose local name is ``name``, in document order."""
    return [child for child in element if local_name(child.tag) == name]


def child(element: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in element if local_name(c.tag) == name), None)


def descendants(element: ET.Element, name: str) -> Iterator[ET.Element]:
    return (e for e in element.iter() if local_name(e.tag) == name)


def text(element: ET.Element | None, name: str | None = None) -> str:
    """Stripped text of ``element`` (or of its first child called ``name``); ``""`` when absent."""
    if element is not None and name is not None:
        element = child(element, name)
    if element is None:
        return ""
    return "".join(element.itertext()).strip()

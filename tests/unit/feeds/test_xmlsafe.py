"""Hostile XML is refused before it can hurt: each attack gets a clear reason, quickly, in bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from pipeline.domain.feeds import xmlsafe
from pipeline.domain.feeds.base import FeedError

HOSTILE = Path(__file__).resolve().parents[2] / "fixtures" / "feeds" / "hostile"
SAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "samples"


def refusal(data: bytes, **limits: object) -> str:
    with pytest.raises(FeedError) as caught:
        xmlsafe.parse_xml(data, **limits)  # type: ignore[arg-type]
    return str(caught.value)


def refused_in_bounded_memory(data: bytes) -> str:
    tracemalloc.start()
    try:
        reason = refusal(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * len(data) + 2_000_000, f"peak {peak} bytes while refusing a {len(data)}-byte document"
    return reason


def test_billion_laughs_is_refused_as_entity_expansion() -> None:
    reason = refused_in_bounded_memory((HOSTILE / "billion_laughs.xml").read_bytes())
    assert "entity-expansion" in reason
    assert "\n" not in reason


def test_quadratic_blowup_is_refused_as_entity_expansion() -> None:
    reason = refused_in_bounded_memory((HOSTILE / "quadratic_blowup.xml").read_bytes())
    assert "entity-expansion" in reason


def test_external_entity_reading_a_local_file_is_refused() -> None:
    reason = refused_in_bounded_memory((HOSTILE / "xxe_file.xml").read_bytes())
    assert "external entity" in reason
    assert "root:" not in reason  # nothing of /etc/passwd leaks into the reason


def test_external_parameter_entity_over_http_is_refused() -> None:
    reason = refusal((HOSTILE / "xxe_http.xml").read_bytes())
    assert "external entity" in reason


def test_document_type_pointing_at_a_remote_dtd_is_refused() -> None:
    reason = refusal((HOSTILE / "external_dtd.xml").read_bytes())
    assert "external DTD" in reason


def test_a_bare_doctype_is_refused_too() -> None:
    assert "DTD" in refusal(b'<?xml version="1.0"?><!DOCTYPE alert><alert/>')


def test_undeclared_entity_reference_is_a_well_formedness_error() -> None:
    assert refusal(b"<alert>&secret;</alert>").startswith("not well-formed XML: undefined entity")


def test_oversized_document_is_refused_before_parsing() -> None:
    reason = refusal(b"<a>" + b"x" * 2000 + b"</a>", max_bytes=1000)
    assert "exceeds the 1000-byte limit" in reason


def test_flood_of_tiny_elements_is_refused() -> None:
    reason = refusal(b"<a>" + b"<b/>" * 2000 + b"</a>", max_elements=1000)
    assert "more than 1000 elements" in reason


def test_pathologically_deep_nesting_is_refused() -> None:
    reason = refusal(b"<a>" * 5000 + b"</a>" * 5000)
    assert f"deeper than {xmlsafe.MAX_DEPTH}" in reason


def test_parse_time_is_capped() -> None:
    ticks = iter(range(1000))
    reason = refusal(b"<a>" + b"<b>text</b>" * 20_000 + b"</a>", max_seconds=2, clock=lambda: float(next(ticks)))
    assert "longer than 2 s" in reason


def test_malformed_and_empty_documents_get_one_line_reasons() -> None:
    assert refusal(b"<alert><identifier>x</alert>").startswith("not well-formed XML")
    assert refusal(b"\xef\xbb\xbf  \n") == "XML refused: empty document"


def test_utf8_bom_is_stripped_and_namespaces_are_matched_on_local_names() -> None:
    doc = ('\ufeff<?xml version="1.0" encoding="UTF-8"?>'
           '<alert xmlns="urn:oasis:names:tc:emergency:cap:1.1"><identifier> A-1 </identifier>'
           '<info><headline>Flood in Padang</headline></info></alert>').encode()
    root = xmlsafe.parse_xml(doc)
    assert xmlsafe.local_name(root.tag) == "alert"
    assert xmlsafe.namespace(root.tag) == "urn:oasis:names:tc:emergency:cap:1.1"
    assert xmlsafe.text(root, "identifier") == "A-1"
    [info] = xmlsafe.children(root, "info")
    assert xmlsafe.text(info, "headline") == "Flood in Padang"
    assert xmlsafe.text(root, "missing") == ""


def test_gdacs_sample_with_bom_parses() -> None:
    path = SAMPLES / "gdacs" / "gdacs_rss_7d_2022-11-26_whatisc-up25.xml"
    if not path.exists():
        pytest.skip("GDACS sample not present")
    assert path.read_bytes().startswith(xmlsafe.UTF8_BOM)
    assert xmlsafe.local_name(xmlsafe.parse_xml(path.read_bytes()).tag) == "rss"

"""The pure rule of :mod:`pipeline.end_offsets`: the end is the largest of what ``ListOffsets`` said,
the fetch's high watermark and the offset after each batch fetched (the broker part is in
tests/integration/test_embedded_broker.py)."""

from __future__ import annotations

from pipeline.end_offsets import true_end


def test_a_short_listed_end_is_corrected_by_the_last_batch_or_the_high_watermark() -> None:
    assert true_end(11, 15, [15]) == 15  # Tansu: the last batch is offsets 10..14
    assert true_end(11, None, [15]) == 15
    assert true_end(11, 15, []) == 15


def test_an_exact_listed_end_stands() -> None:
    assert true_end(15, 15, [15]) == 15  # Apache Kafka
    assert true_end(15, None, []) == 15

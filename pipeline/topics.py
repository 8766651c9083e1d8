"""Topic names: the one place that spells them."""

from __future__ import annotations

from typing import Final

CHECKINS: Final = "checkins"
CITIZENS: Final = "citizens"
CRISIS_EVENTS: Final = "crisis-events"
ACKS: Final = "acks"
WARNINGS: Final = "warnings"
CRISIS_STATUS: Final = "crisis-status"
DELIVERIES: Final = "deliveries"
FEED_REVIEW: Final = "feed-review"
CASES: Final = "cases"
DLQ: Final = "dlq"

# Topics every deployment needs; per-country warning topics are created on first use.
CORE_TOPICS: Final = (CHECKINS, CITIZENS, CRISIS_EVENTS, ACKS, WARNINGS, CRISIS_STATUS, DELIVERIES, CASES, FEED_REVIEW,
                       DLQ)

# On a warning published again by escalation: send it through the citizen's next channel.
RESEND_HEADER: Final = "crisiswatch-resend"
RESEND_NEXT_CHANNEL: Final = b"next-channel"

# Headers on a dead-lettered message.
DLQ_REASON_HEADER: Final = "crisiswatch-dlq-reason"
DLQ_SOURCE_TOPIC_HEADER: Final = "crisiswatch-dlq-topic"
DLQ_STAGE_HEADER: Final = "crisiswatch-dlq-stage"
DLQ_ERROR_TYPE_HEADER: Final = "crisiswatch-dlq-error-type"
DLQ_SOURCE_PARTITION_HEADER: Final = "crisiswatch-dlq-partition"
DLQ_SOURCE_OFFSET_HEADER: Final = "crisiswatch-dlq-offset"
DLQ_ORIGINAL_SIZE_HEADER: Final = "crisiswatch-dlq-original-size"
DLQ_ORIGINAL_SHA256_HEADER: Final = "crisiswatch-dlq-original-sha256"
DLQ_TRUNCATED_HEADER: Final = "crisiswatch-dlq-truncated"


def _country(country_code: str) -> str:
    cc = country_code.upper()
    if len(cc) != 2 or not cc.isascii() or not cc.isalpha():
        raise ValueError(f"not an ISO 3166-1 alpha-2 code: {country_code!r}")
    return cc


def country_warning_topic(country_code: str) -> str:
    """``warnings.<CC>``: warnings about crises in one country, for that country's crisis managers."""
    return f"{WARNINGS}.{_country(country_code)}"


def country_case_topic(country_code: str, cases_topic: str = CASES) -> str:
    """``cases.<CC>``: the cases of citizens in one country, for the embassy responsible there."""
    return f"{cases_topic}.{_country(country_code)}"

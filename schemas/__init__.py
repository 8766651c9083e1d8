"""crisiswatch wire contract: JSON Schemas (draft 2020-12) and the typed models checked against them."""

from schemas.codec import InvalidEvent, check, decode, encode, from_obj, parse_json
from schemas.models import (
    Ack,
    Case,
    Channel,
    Checkin,
    Citizen,
    Crisis,
    CrisisStatus,
    Delivery,
    Event,
    Warning,
    format_time,
    parse_time,
)

__all__ = [
    "Ack", "Case", "Channel", "Checkin", "Citizen", "Crisis", "CrisisStatus", "Delivery", "Event", "InvalidEvent", "Warning",
    "check", "decode", "encode", "format_time", "from_obj", "parse_json", "parse_time",
]

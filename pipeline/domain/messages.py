"""The words a citizen reads: the instruction of each warning, by kind."""

from __future__ import annotations

from schemas import Crisis
from schemas.models import WarningKind

DEFAULT_INSIDE = "Follow the instructions of local authorities. Reply SAFE if you are safe, or HELP if you need help."


def instruction_for(crisis: Crisis, kind: WarningKind, distance_km: float) -> str:
    own = crisis.instruction.strip()
    if kind in ("inside", "entered"):
        return own or DEFAULT_INSIDE
    if kind == "near":
        lead = f"You are {distance_km:.1f} km from the affected area. Avoid travelling into it."
        return f"{lead} {own}".strip()
    if kind == "pre_arrival":
        lead = "Your registered trip goes where this crisis is. Consider postponing it; if you travel, register your arrival."
        return f"{lead} {own}".strip()
    if kind == "in_country":  # a citizen not tracked (no location_tracking consent), warned by their trip
        lead = "A crisis has been declared in the country of your registered trip. Check whether it concerns you."
        return f"{lead} {own or DEFAULT_INSIDE}".strip()
    if kind == "exited":
        return "You have left the affected area. Stay away from it and keep monitoring local news."
    return f"The crisis '{crisis.title}' is over: the authorities have lifted the warning."

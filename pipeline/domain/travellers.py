"""Simulated travellers abroad: who they are (``citizen/1``) and where they report from (``checkin/1``).

A pure model, driven by an injected start time and a seed, that the simulator, the demo and the
tests share. Each traveller stays at a hotel near a real city's centre, reports through a device
whose accuracy depends on the channel (a phone app reports within tens of metres, an SMS
location from a cell tower within kilometres), goes out on excursions of up to ~30 km and back,
and now and then moves on to another city of the same country.

Every traveller draws from its own random stream (seeded from the model seed and its index), so
one traveller's path does not depend on how often the others were asked where they are. Times
asked of one traveller must not go backwards: the path is planned lazily, leg by leg.

Addresses are harmless by construction: e-mail and webhooks under ``example.org`` (RFC 2606) and
telephone numbers from ranges reserved for drama and documentation (Ofcom's +44 7700 900xxx and
the North American 555-01xx), so a simulated warning can never reach a real person.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import accumulate
from typing import NamedTuple

from schemas import Channel, Checkin, Citizen
from schemas.models import CheckinSource

EARTH_RADIUS_M = 6_371_008.8
METRES_PER_DEGREE_LAT = 111_320.0
EXCURSION_MAX_KM = 30.0
FOREVER = timedelta(days=3650)


class City(NamedTuple):
    name: str
    country_code: str
    lat: float
    lon: float
    population: int


Point = tuple[float, float]  # (lat, lon)
ChooseCity = Callable[[random.Random], City]
ChooseHotel = Callable[[random.Random], Point]


# --- geometry (spherical approximations are plenty for a simulation) ---------------------------


def distance_m(a: Point, b: Point) -> float:
    """Great-circle distance (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _wrap_lon(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


def offset(point: Point, north_m: float, east_m: float) -> Point:
    """The point ``north_m`` / ``east_m`` metres away (local flat-earth step, fine below ~100 km)."""
    lat = max(-89.9, min(89.9, point[0] + north_m / METRES_PER_DEGREE_LAT))
    cos_lat = max(0.01, math.cos(math.radians(point[0])))
    return lat, _wrap_lon(point[1] + east_m / (METRES_PER_DEGREE_LAT * cos_lat))


def _polar(point: Point, distance: float, bearing_rad: float) -> Point:
    return offset(point, distance * math.cos(bearing_rad), distance * math.sin(bearing_rad))


def _between(a: Point, b: Point, fraction: float) -> Point:
    dlon = b[1] - a[1]
    if dlon > 180.0:
        dlon -= 360.0
    elif dlon < -180.0:
        dlon += 360.0
    return a[0] + (b[0] - a[0]) * fraction, _wrap_lon(a[1] + dlon * fraction)


# --- who the travellers are --------------------------------------------------------------------

GIVEN_NAMES = (
    "Budi", "Siti", "Agus", "Dewi", "Rizky", "Putri", "Andi", "Sri", "Wahyu", "Nur", "Eko", "Ayu", "Fajar",
    "Indah", "Hendra", "Ratna", "Bayu", "Lestari", "Dimas", "Kartika", "Yusuf", "Fitri", "Arif", "Rina", "Gilang",
    "Wulan", "Teguh", "Maya", "Hadi", "Nadia", "Joko", "Intan", "Rudi", "Anisa", "Bambang", "Yuliana", "Taufik",
    "Mega", "Irfan", "Sekar",
)
FAMILY_NAMES = (
    "Santoso", "Wijaya", "Pratama", "Saputra", "Hidayat", "Kusuma", "Nugroho", "Setiawan", "Siregar", "Simanjuntak",
    "Lubis", "Harahap", "Nasution", "Sinaga", "Wibowo", "Susanto", "Rahman", "Hakim", "Permana", "Gunawan",
    "Halim", "Tanjung", "Situmorang", "Manurung", "Sembiring", "Ginting", "Hutapea", "Purnomo", "Utomo", "Syahputra",
)
RELATIONS = ("spouse", "parent", "sibling", "child", "employer", "friend")
# Most registrants of an Indonesian ministry are Indonesian; a few family members are not.
OTHER_NATIONALITIES = ("MY", "SG", "AU", "NL", "JP")


def reserved_phone(rng: random.Random) -> str:
    """A telephone number from a range reserved for fiction and documentation."""
    if rng.random() < 0.5:
        return f"+447700900{rng.randrange(1000):03d}"
    return f"+1{rng.randrange(201, 990)}55501{rng.randrange(100):02d}"


def _slug(name: str) -> str:
    return ".".join(name.lower().split())


def make_citizen(rng: random.Random, citizen_id: str, country_code: str, start: datetime,
                 nationality: str = "ID") -> tuple[Citizen, CheckinSource]:
    """A plausible ``citizen/1`` registration, and the kind of device this traveller reports with."""
    given = rng.choice(GIVEN_NAMES)
    # Many Indonesians go by a single name.
    name = given if rng.random() < 0.25 else f"{given} {rng.choice(FAMILY_NAMES)}"
    if nationality == "ID" and rng.random() < 0.03:
        nationality = rng.choice(OTHER_NATIONALITIES)
    language = ("id" if rng.random() < 0.85 else "en") if nationality == "ID" else "en"

    device: CheckinSource
    roll = rng.random()
    device = "app" if roll < 0.80 else "sms" if roll < 0.95 else "manual"
    channels = []
    if device == "app":
        channels.append(Channel("push", f"fcm:{rng.getrandbits(96):024x}"))
    channels.append(Channel("sms", reserved_phone(rng)))
    if rng.random() < 0.7:
        channels.append(Channel("email", f"{_slug(name)}{rng.randrange(100)}@example.org"))
    if rng.random() < 0.03:  # travelling for a company whose security desk wants a copy
        channels.append(Channel("webhook", f"https://hooks.example.org/travel-desk/{citizen_id}"))

    contacts = []
    for _ in range(rng.choice((1, 1, 2))):
        contact = {"name": f"{rng.choice(GIVEN_NAMES)} {rng.choice(FAMILY_NAMES)}", "relation": rng.choice(RELATIONS),
                   "phone": reserved_phone(rng)}
        if rng.random() < 0.3:
            contact["email"] = f"{_slug(contact['name'])}@example.org"
        contacts.append(contact)

    arrived = start.date() - timedelta(days=rng.randrange(0, 21))
    # Students and migrant workers register without a return date.
    until = None if rng.random() < 0.3 else (start.date() + timedelta(days=rng.randrange(2, 60))).isoformat()
    trip = {"country": country_code, "from": arrived.isoformat(), "until": until}
    # Every simulated traveller reports where they are, so every one consents to location tracking (a check-in
    # of a citizen who does not is refused: pipeline/consent.py). A scenario that wants travellers without
    # consent registers them so and sends none of their check-ins (the demo does). The draw is kept so that a
    # seed gives the travellers it always gave.
    if device == "app":
        rng.random()
    citizen = Citizen(citizen_id=citizen_id, name=name, nationality=nationality, language=language,
                      channels=tuple(channels), emergency_contacts=tuple(contacts), location_tracking=True, trip=trip)
    return citizen, device


# --- how they move -----------------------------------------------------------------------------

# Horizontal accuracy (metres) by how the location was obtained: GPS in an app, cell-tower
# location behind an SMS, a place typed in by hand.
ACCURACY_M: dict[str, tuple[float, float]] = {"app": (5.0, 50.0), "sms": (300.0, 3000.0), "manual": (50.0, 500.0)}
# Seconds between reports: an app with location consent reports in the background; others when they remember.
REPORT_INTERVAL_S: dict[str, tuple[float, float]] = {"app": (300.0, 1800.0), "sms": (7200.0, 43200.0),
                                                     "manual": (21600.0, 86400.0)}
CITY_SPEED_MPS = 7.0  # ~25 km/h through city traffic
ROAD_SPEED_MPS = 20.0  # ~70 km/h between nearby cities
FLIGHT_SPEED_MPS = 140.0  # ~500 km/h door to door, airports included
EXACT_ACCURACY_M = 5.0  # what a scripted, exact report claims: a good GPS fix


@dataclass(frozen=True, slots=True)
class Leg:
    """Travel from ``origin`` (leaving at ``depart``) to ``destination`` (at ``arrive``), then stay until ``stay_until``."""

    origin: Point
    destination: Point
    depart: datetime
    arrive: datetime
    stay_until: datetime
    at_base: bool

    def position(self, at: datetime) -> Point:
        if at >= self.arrive:
            return self.destination
        if at <= self.depart:
            return self.origin
        fraction = (at - self.depart) / (self.arrive - self.depart)
        return _between(self.origin, self.destination, fraction)


def _stay(point: Point, at: datetime, seconds: float, at_base: bool) -> Leg:
    return Leg(point, point, at, at, at + timedelta(seconds=seconds), at_base)


def _travel(origin: Point, destination: Point, at: datetime, speed_mps: float, stay_s: float, at_base: bool) -> Leg:
    arrive = at + timedelta(seconds=distance_m(origin, destination) / speed_mps)
    return Leg(origin, destination, at, arrive, arrive + timedelta(seconds=stay_s), at_base)


@dataclass(slots=True)
class Traveller:
    citizen: Citizen
    device: CheckinSource
    rng: random.Random
    city: City
    hotel: Point
    roam: bool
    leg: Leg
    interval_s: float

    @property
    def citizen_id(self) -> str:
        return self.citizen.citizen_id


class _CityPicker:
    """Population-weighted choice of a city, overall or within one country."""

    def __init__(self, cities: Sequence[City]) -> None:
        self.cities = list(cities)
        self._cum = list(accumulate(max(1, c.population) for c in self.cities))
        self.by_country: dict[str, list[City]] = {}
        for city in self.cities:
            self.by_country.setdefault(city.country_code, []).append(city)
        self._cum_by_country = {cc: list(accumulate(max(1, c.population) for c in cs)) for cc, cs in self.by_country.items()}

    def any(self, rng: random.Random) -> City:
        return self.cities[bisect.bisect_right(self._cum, rng.random() * self._cum[-1])]

    def weighted_by_country(self, weights: Mapping[str, float]) -> ChooseCity:
        """A country by ``weights`` (those without cities left out), then a city in it by population."""
        countries = [cc for cc, w in sorted(weights.items()) if w > 0 and cc in self.by_country]
        if not countries:
            raise ValueError("none of the weighted countries has a city in the list")
        cum = list(accumulate(weights[cc] for cc in countries))

        def choose(rng: random.Random) -> City:
            country = countries[bisect.bisect_right(cum, rng.random() * cum[-1])]
            city = self.in_country(rng, country)
            assert city is not None
            return city

        return choose

    def in_country(self, rng: random.Random, country_code: str, exclude: City | None = None) -> City | None:
        options = self.by_country.get(country_code, [])
        if not options or (len(options) == 1 and options[0] == exclude):
            return None
        cum = self._cum_by_country[country_code]
        for _ in range(20):
            city = options[bisect.bisect_right(cum, rng.random() * cum[-1])]
            if city != exclude:
                return city
        return None


def city_spread_m(city: City) -> float:
    """Typical distance of a visitor's hotel from the city centre: wider for bigger cities (1–12 km)."""
    return 1000.0 * max(1.0, min(12.0, 2.0 + 3.0 * math.log10(max(city.population, 10_000) / 100_000)))


class TravellerModel:
    """A population of travellers abroad around ``cities`` (weighted by population, or first by
    ``country_weights`` and then by population within the country), from ``start`` on.

    ``citizens()`` are their registrations; ``step(now)`` the check-ins due by ``now`` when every
    traveller reports at its own pace; ``checkins(rate, duration)`` a time-ordered stream at a
    fixed aggregate rate; ``add_cluster`` and ``move_into`` script who is where for a scenario.
    """

    def __init__(self, cities: Sequence[City], n: int, seed: int, start: datetime, *, id_prefix: str = "sim",
                 nationality: str = "ID", country_weights: Mapping[str, float] | None = None) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if n > 0 and not cities:
            raise ValueError("no cities to place travellers in")
        if n < 0:
            raise ValueError("n must be >= 0")
        self.start = start
        self.seed = seed
        self.id_prefix = id_prefix
        self.nationality = nationality
        self._picker = _CityPicker(cities)
        self._travellers: list[Traveller] = []
        self._index: dict[str, int] = {}
        self._due: list[tuple[datetime, int]] = []
        choose = self._picker.any if country_weights is None else self._picker.weighted_by_country(country_weights)
        for _ in range(n):
            self._add(choose, roam=True)

    # -- population

    def _add(self, choose_city: ChooseCity, roam: bool, hotel_of: ChooseHotel | None = None) -> Traveller:
        index = len(self._travellers)
        rng = random.Random(f"{self.seed}:{index}")
        city = choose_city(rng)
        citizen_id = f"{self.id_prefix}-{index:06d}"
        citizen, device = make_citizen(rng, citizen_id, city.country_code, self.start, self.nationality)
        if hotel_of is None:
            spread = city_spread_m(city)
            hotel = _polar((city.lat, city.lon), min(3 * spread, abs(rng.gauss(0.0, spread))), rng.uniform(0, 2 * math.pi))
        else:
            hotel = hotel_of(rng)
        # A random phase, so that the population does not leave the hotel all at once.
        leg = _stay(hotel, self.start, rng.uniform(0, 8 * 3600), at_base=True)
        low, high = REPORT_INTERVAL_S[device]
        traveller = Traveller(citizen, device, rng, city, hotel, roam, leg, rng.uniform(low, high))
        self._travellers.append(traveller)
        self._index[citizen_id] = index
        heapq.heappush(self._due, (self.start + timedelta(seconds=rng.uniform(0, traveller.interval_s)), index))
        return traveller

    def add_cluster(self, center: City, n: int, radius_km: float = 10.0, *, roam: bool = True) -> list[Citizen]:
        """``n`` more travellers with hotels spread evenly within ``radius_km`` of ``center``.

        ``center`` may be any point (``City("Shibuya", "JP", 35.66, 139.70, 0)``). With ``roam=False``
        they stay at their hotels until moved with :meth:`move_into`, which keeps a scenario predictable.
        """
        radius_m = radius_km * 1000.0

        def hotel_of(rng: random.Random) -> Point:
            return _polar((center.lat, center.lon), radius_m * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi))

        return [self._add(lambda _rng: center, roam, hotel_of).citizen for _ in range(n)]

    def citizens(self) -> list[Citizen]:
        return [t.citizen for t in self._travellers]

    def traveller(self, citizen_id: str) -> Traveller:
        try:
            return self._travellers[self._index[citizen_id]]
        except KeyError:
            raise KeyError(f"no simulated traveller {citizen_id!r}") from None

    def __len__(self) -> int:
        return len(self._travellers)

    # -- movement

    def _next_leg(self, t: Traveller) -> Leg:
        rng, here, at = t.rng, t.leg.destination, t.leg.stay_until
        if not t.leg.at_base:
            return _travel(here, t.hotel, at, CITY_SPEED_MPS, rng.uniform(2, 10) * 3600, at_base=True)
        if not t.roam:
            return _stay(here, at, rng.uniform(1, 8) * 3600, at_base=True)
        roll = rng.random()
        if roll < 0.05:
            city = self._picker.in_country(rng, t.city.country_code, exclude=t.city)
            if city is not None:
                spread = city_spread_m(city)
                t.city = city
                t.hotel = _polar((city.lat, city.lon), min(3 * spread, abs(rng.gauss(0.0, spread))),
                                 rng.uniform(0, 2 * math.pi))
                speed = ROAD_SPEED_MPS if distance_m(here, t.hotel) < 400_000 else FLIGHT_SPEED_MPS
                return _travel(here, t.hotel, at, speed, rng.uniform(4, 24) * 3600, at_base=True)
        if roll < 0.55:
            km = min(EXCURSION_MAX_KM, rng.expovariate(1 / 5.0))
            spot = _polar(t.hotel, km * 1000.0, rng.uniform(0, 2 * math.pi))
            return _travel(here, spot, at, CITY_SPEED_MPS, rng.uniform(0.5, 4) * 3600, at_base=False)
        return _stay(here, at, rng.uniform(1, 8) * 3600, at_base=True)

    def position(self, citizen_id: str, at: datetime) -> Point:
        """Where the traveller really is at ``at`` (before any GPS error)."""
        return self._true_position(self.traveller(citizen_id), at)

    def _true_position(self, t: Traveller, at: datetime) -> Point:
        while at >= t.leg.stay_until:
            t.leg = self._next_leg(t)
        return t.leg.position(at)

    def _observe(self, t: Traveller, at: datetime, *, exact: bool = False) -> Checkin:
        truth = self._true_position(t, at)
        low, high = ACCURACY_M[t.device]
        # Log-uniform: most fixes are good, a few are poor.
        accuracy = EXACT_ACCURACY_M if exact else math.exp(t.rng.uniform(math.log(low), math.log(high)))
        if exact:
            lat, lon = truth
        else:
            # accuracy_m is the 68 % radius; a 2-D normal with sigma = r / 1.51 has 68 % of its mass within r.
            sigma = accuracy / 1.51
            lat, lon = offset(truth, t.rng.gauss(0.0, sigma), t.rng.gauss(0.0, sigma))
        return Checkin(citizen_id=t.citizen_id, lat=round(lat, 6), lon=round(lon, 6), observed_at=at,
                       source=t.device, accuracy_m=round(accuracy, 1))

    def checkin(self, citizen_id: str, at: datetime) -> Checkin:
        """One report of this traveller at ``at``."""
        return self._observe(self.traveller(citizen_id), at)

    def move_into(self, citizen_id: str, lat: float, lon: float, at: datetime, *, travel_s: float = 0.0,
                  steps: int = 1, stay_s: float | None = None, exact: bool = True) -> list[Checkin]:
        """Send the traveller to (lat, lon): leaving at ``at``, arriving ``travel_s`` later, staying
        ``stay_s`` (None: until moved again). Returns ``steps`` check-ins evenly spaced along the way,
        the last one on arrival; ``exact`` reports the true position with a 5 m accuracy (a scenario
        wants to know on which side of a boundary the report falls).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        t = self.traveller(citizen_id)
        origin = self._true_position(t, at)
        arrive = at + timedelta(seconds=travel_s)
        stay_until = arrive + (FOREVER if stay_s is None else timedelta(seconds=stay_s))
        t.leg = Leg(origin, (lat, lon), at, arrive, stay_until, at_base=False)
        times = [arrive] if steps == 1 else [at + timedelta(seconds=travel_s * (i + 1) / steps) for i in range(steps)]
        return [self._observe(t, moment, exact=exact) for moment in times]

    def return_to_base(self, citizen_id: str, at: datetime, *, travel_s: float = 0.0, steps: int = 1,
                       exact: bool = True) -> list[Checkin]:
        """Send the traveller back to their hotel (see :meth:`move_into`); normal life resumes there."""
        t = self.traveller(citizen_id)
        hotel = t.hotel
        checkins = self.move_into(citizen_id, hotel[0], hotel[1], at, travel_s=travel_s, steps=steps, exact=exact)
        t.leg = replace(t.leg, stay_until=t.leg.arrive + timedelta(hours=t.rng.uniform(1, 8)), at_base=True)
        return checkins

    def within(self, lat: float, lon: float, radius_km: float, at: datetime) -> list[str]:
        """Citizen ids of the travellers truly within ``radius_km`` of (lat, lon) at ``at``."""
        centre, limit = (lat, lon), radius_km * 1000.0
        return [t.citizen_id for t in self._travellers if distance_m(self._true_position(t, at), centre) <= limit]

    # -- reporting

    def step(self, now: datetime) -> list[Checkin]:
        """The check-ins of every traveller due to report by ``now``, in time order (each at its due time)."""
        out = []
        while self._due and self._due[0][0] <= now:
            due, index = heapq.heappop(self._due)
            t = self._travellers[index]
            out.append(self._observe(t, due))
            heapq.heappush(self._due, (due + timedelta(seconds=t.interval_s * t.rng.uniform(0.8, 1.2)), index))
        return out

    def checkins(self, rate_per_s: float, duration_s: float | None = None,
                 start: datetime | None = None) -> Iterator[Checkin]:
        """A time-ordered stream at ``rate_per_s`` in total: the k-th check-in is observed at
        ``start + k / rate_per_s``. Travellers take turns in a reshuffled order each round, so all
        report equally often. ``duration_s`` None: endless.
        """
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if not self._travellers:
            return
        origin = self.start if start is None else start
        total = None if duration_s is None else round(rate_per_s * duration_s)
        order_rng = random.Random(f"{self.seed}:order")
        order = list(range(len(self._travellers)))
        counter = itertools.count() if total is None else iter(range(total))
        for k in counter:
            turn = k % len(order)
            if turn == 0:
                order_rng.shuffle(order)
            yield self._observe(self._travellers[order[turn]], origin + timedelta(seconds=k / rate_per_s))

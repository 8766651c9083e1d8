-- crisiswatch registry and audit schema, version 1.
-- PostgreSQL is the system of record for citizens, crises, warnings sent, deliveries and replies.
-- Every table written from Kafka has a deterministic key so that a replay is a no-op.
-- Geometries are GeoJSON in jsonb: no PostGIS, so the embedded PostgreSQL can run it.

-- The registry: one row per citizen, the latest registration wins.
CREATE TABLE citizens (
    citizen_id          text PRIMARY KEY,
    name                text NOT NULL,
    nationality         text NOT NULL CHECK (nationality ~ '^[A-Z]{2}$'),
    language            text NOT NULL,
    channels            jsonb NOT NULL DEFAULT '[]'::jsonb,
    emergency_contacts  jsonb NOT NULL DEFAULT '[]'::jsonb,
    location_tracking   boolean NOT NULL,
    trip_country        text CHECK (trip_country ~ '^[A-Z]{2}$'),
    trip_from           date,
    trip_until          date,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX citizens_trip_country_idx ON citizens (trip_country) WHERE trip_country IS NOT NULL;

-- Every version of every crisis, as published on crisis-events.
CREATE TABLE crises (
    crisis_id       text NOT NULL,
    version         bigint  NOT NULL CHECK (version >= 1),
    op              text NOT NULL CHECK (op IN ('upsert', 'cancel')),
    source          text NOT NULL,
    source_ref      text NOT NULL,
    title           text NOT NULL,
    category        text NOT NULL,
    severity        text NOT NULL,
    urgency         text NOT NULL,
    certainty       text NOT NULL,
    geometry        jsonb,
    buffer_km       double precision NOT NULL CHECK (buffer_km >= 0),
    country_codes   text[] NOT NULL DEFAULT '{}',
    effective       timestamptz NOT NULL,
    expires         timestamptz,
    instruction     text NOT NULL,
    url             text NOT NULL,
    "references"    text[] NOT NULL DEFAULT '{}',
    language        text,
    status          text NOT NULL DEFAULT 'actual',
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (crisis_id, version)
);
CREATE INDEX crises_country_codes_idx ON crises USING gin (country_codes);

-- The newest version of each crisis: what an operator means by "the crisis".
CREATE VIEW crises_current AS
    SELECT DISTINCT ON (crisis_id) *
    FROM crises
    ORDER BY crisis_id, version DESC;

-- Warnings sent, keyed by the deterministic warning_id (citizen, crisis, crisis version, kind).
CREATE TABLE warnings (
    warning_id      text PRIMARY KEY,
    citizen_id      text NOT NULL,
    crisis_id       text NOT NULL,
    crisis_version  bigint  NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('inside', 'entered', 'near', 'exited', 'all_clear')),
    severity        text NOT NULL,
    title           text NOT NULL,
    instruction     text NOT NULL,
    distance_km     double precision NOT NULL CHECK (distance_km >= 0),
    lat             double precision NOT NULL,
    lon             double precision NOT NULL,
    observed_at     timestamptz NOT NULL,
    emitted_at      timestamptz NOT NULL,
    country_codes   text[] NOT NULL DEFAULT '{}',
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX warnings_crisis_idx ON warnings (crisis_id, crisis_version);
CREATE INDEX warnings_citizen_idx ON warnings (citizen_id, emitted_at);

-- Citizens' replies ("I am safe" / "I need help"). The natural key makes a replayed reply a no-op
-- while a later reply (a change of status) is kept as history.
CREATE TABLE acks (
    citizen_id   text NOT NULL,
    crisis_id    text NOT NULL,
    received_at  timestamptz NOT NULL,
    status       text NOT NULL CHECK (status IN ('safe', 'need_help')),
    channel      text NOT NULL,
    note         text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (citizen_id, crisis_id, received_at, status, channel)
);
CREATE INDEX acks_crisis_idx ON acks (crisis_id, received_at);

-- Location history, kept for CRISISWATCH_CHECKIN_RETENTION_DAYS.
CREATE TABLE checkins (
    citizen_id   text NOT NULL,
    observed_at  timestamptz NOT NULL,
    source       text NOT NULL,
    lat          double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon          double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    accuracy_m   double precision,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (citizen_id, observed_at, source)
);
-- The retention sweep deletes by age.
CREATE INDEX checkins_observed_at_idx ON checkins (observed_at);

-- One row per (warning, channel, address) the dispatcher tries; updated as attempts are made.
CREATE TABLE deliveries (
    warning_id       text NOT NULL,
    channel          text NOT NULL CHECK (channel IN ('webhook', 'email', 'sms', 'push')),
    address          text NOT NULL,
    citizen_id       text NOT NULL,
    crisis_id        text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'sending', 'delivered', 'failed', 'gave_up')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error       text,
    receipt          jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    next_attempt_at  timestamptz,
    delivered_at     timestamptz,
    PRIMARY KEY (warning_id, channel, address)
);
CREATE INDEX deliveries_crisis_idx ON deliveries (crisis_id, status);
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at) WHERE status IN ('pending', 'sending');

-- Accountability per crisis, escalation of the silent, and the pre-arrival warning.

-- The latest crisis-status/1 of each crisis, as the accountability agent published it (the sink writes
-- it; a status older than the stored one changes nothing: latest wins by as_of).
CREATE TABLE crisis_status (
    crisis_id   text PRIMARY KEY,
    inside      integer NOT NULL CHECK (inside >= 0),
    near        integer NOT NULL CHECK (near >= 0),
    warned      integer NOT NULL CHECK (warned >= 0),
    delivered   integer NOT NULL CHECK (delivered >= 0),
    safe        integer NOT NULL CHECK (safe >= 0),
    need_help   integer NOT NULL CHECK (need_help >= 0),
    unreached   integer NOT NULL CHECK (unreached >= 0),
    escalated   integer NOT NULL CHECK (escalated >= 0),
    as_of       timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- How far the escalation of one silent citizen in one crisis went: re-sent through the next channel
-- (T1), then a case opened for the embassy (T2). Each step once.
CREATE TABLE escalations (
    crisis_id       text NOT NULL,
    citizen_id      text NOT NULL,
    level           smallint NOT NULL CHECK (level BETWEEN 0 AND 2),
    resent_at       timestamptz,
    case_opened_at  timestamptz,
    case_id         text,
    PRIMARY KEY (crisis_id, citizen_id)
);

-- A warning before departure to a country with an active severe or extreme crisis.
ALTER TABLE warnings DROP CONSTRAINT warnings_kind_check;
ALTER TABLE warnings ADD CONSTRAINT warnings_kind_check
    CHECK (kind IN ('inside', 'entered', 'near', 'exited', 'all_clear', 'pre_arrival'));

-- crisiswatch schema, version 2: consular cases, and finding a citizen by the number an SMS came from.

-- One row per case, its latest version as published on the cases topic (case/1). The sink keeps the
-- version with the newest updated_at, so a replayed older event never moves a case back.
CREATE TABLE cases (
    case_id      text PRIMARY KEY,
    citizen_id   text NOT NULL,
    crisis_id    text,
    kind         text NOT NULL CHECK (kind IN ('sos', 'need_help', 'escalation')),
    state        text NOT NULL CHECK (state IN ('open', 'assigned', 'closed')),
    assignee     text,
    country      text CHECK (country ~ '^[A-Z]{2}$'),
    lat          double precision CHECK (lat BETWEEN -90 AND 90),
    lon          double precision CHECK (lon BETWEEN -180 AND 180),
    note         text NOT NULL DEFAULT '',
    opened_at    timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cases_state_idx ON cases (state, updated_at DESC);
CREATE INDEX cases_crisis_idx ON cases (crisis_id) WHERE crisis_id IS NOT NULL;

-- Every version a case took, written by the database itself whenever the cases row is inserted or
-- changed: who moved it, when, to what. A replay changes nothing, so it adds nothing.
CREATE TABLE case_history (
    case_id      text NOT NULL REFERENCES cases (case_id) ON DELETE CASCADE,
    updated_at   timestamptz NOT NULL,
    state        text NOT NULL,
    assignee     text,
    note         text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (case_id, updated_at)
);

CREATE FUNCTION cases_keep_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_history (case_id, updated_at, state, assignee, note)
    VALUES (NEW.case_id, NEW.updated_at, NEW.state, NEW.assignee, NEW.note)
    ON CONFLICT (case_id, updated_at) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER cases_history AFTER INSERT OR UPDATE ON cases
    FOR EACH ROW EXECUTE FUNCTION cases_keep_history();

-- A phone number in E.164, as pipeline/domain/replies.py normalise_phone writes it (a test holds the
-- two together): separators dropped, a leading international 00 made +. Anything else is returned as
-- it is, and matches no sender (senders are refused unless they normalise).
CREATE FUNCTION crisiswatch_e164(raw text) RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT regexp_replace(regexp_replace(raw, '[[:space:]().\-/]', '', 'g'), '^00', '+')
$$;

-- The normalised numbers of a citizen's sms channels, indexed: an inbound SMS finds its sender at once.
-- Its search_path is fixed because PostgreSQL builds and maintains an index with a restricted one.
CREATE FUNCTION crisiswatch_sms_numbers(channels jsonb) RETURNS text[] LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path FROM CURRENT AS $$
    SELECT coalesce(array_agg(crisiswatch_e164(c ->> 'address')), '{}')
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(channels) = 'array' THEN channels ELSE '[]'::jsonb END) AS c
    WHERE c ->> 'type' = 'sms'
$$;
CREATE INDEX citizens_sms_numbers_idx ON citizens USING gin (crisiswatch_sms_numbers(channels));

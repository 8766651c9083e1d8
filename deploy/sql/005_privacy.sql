-- Privacy by design: consent enforced where the data is kept, and the audit log of operators' actions.
-- (docs/privacy.md says what is stored, for how long, who sees what, and how erasure works.)

-- Consent. A check-in of a citizen whose registration says location_tracking = false is never stored,
-- whoever writes it: the row is refused with a check_violation the sink dead-letters (without the
-- coordinates). A check-in of a citizen the registry does not know (yet) is stored, and removed by the
-- trigger below should their registration come without consent.
CREATE FUNCTION checkins_require_consent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM citizens WHERE citizen_id = NEW.citizen_id AND NOT location_tracking) THEN
        RAISE EXCEPTION 'the citizen has not consented to location tracking; the check-in is not stored'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'checkins_location_tracking_consent';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER checkins_location_tracking_consent BEFORE INSERT ON checkins
    FOR EACH ROW EXECUTE FUNCTION checkins_require_consent();

-- A registration without consent (new, or consent withdrawn) removes the location history kept so far.
CREATE FUNCTION citizens_forget_untracked_locations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT NEW.location_tracking THEN
        DELETE FROM checkins WHERE citizen_id = NEW.citizen_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER citizens_forget_untracked_locations AFTER INSERT OR UPDATE OF location_tracking ON citizens
    FOR EACH ROW EXECUTE FUNCTION citizens_forget_untracked_locations();

-- Every operator action (declare, update, cancel a crisis; view a citizen; export; change a case; erase a
-- citizen; read this log): who (the API token's name and role), when, what, about whom or what. Details
-- hold identifiers and counts, never coordinates, names or contact details. Readable by admins only
-- (GET /v1/audit); append-only: rows are neither changed nor deleted.
CREATE TABLE audit_log (
    audit_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    role        text NOT NULL CHECK (role IN ('ingest', 'operator', 'admin')),
    action      text NOT NULL,
    subject     text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC);
CREATE INDEX audit_log_subject_idx ON audit_log (subject, at DESC) WHERE subject IS NOT NULL;

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

-- A citizen without consent is warned by the country of their trip instead (pipeline/domain/escalation.py).
ALTER TABLE warnings DROP CONSTRAINT warnings_kind_check;
ALTER TABLE warnings ADD CONSTRAINT warnings_kind_check
    CHECK (kind IN ('inside', 'entered', 'near', 'exited', 'all_clear', 'pre_arrival', 'in_country'));

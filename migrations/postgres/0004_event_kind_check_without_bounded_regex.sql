-- The audit log's kind check, same rule, cheaper form. PostgreSQL's regex engine unrolls a
-- bounded repeat like `{1,64}` into that many automaton states, so `kind ~ '^[a-z_]{1,64}$'`
-- cost about 11 µs per row (200,000 inserted rows in psql: 2.7 s against 0.45 s without the
-- check), and every deduction writes an event: about 7% of the batch writer's CPU in a
-- profile of its backend. A length test plus an unbounded class costs about 0.4 µs per row
-- and accepts exactly the same kinds: 1 to 64 characters, each a-z or '_'.
--
-- NOT VALID, then VALIDATE: the new check is enforced from the ALTER on, and the existing
-- rows are checked under a lock that lets writes go on.
ALTER TABLE billing_events
    DROP CONSTRAINT billing_events_kind_check,
    ADD CONSTRAINT billing_events_kind_check
        CHECK (char_length(kind) <= 64 AND kind ~ '^[a-z_]+$') NOT VALID;
ALTER TABLE billing_events VALIDATE CONSTRAINT billing_events_kind_check;

-- SQLite twin of migrations/postgres: the same data model, translated for SQLite.
--
-- The engine opens the database in WAL mode with synchronous=FULL. Migrations here are never
-- edited once landed; a change is a new numbered file. This first file is the final schema of
-- migrations/postgres 0001 + 0002 (consumption_allocations has no foreign keys).
--
-- Translation: bigint/integer/boolean -> INTEGER (booleans are 0/1, checked); text/timestamptz/
-- jsonb -> TEXT (timestamps as RFC 3339 text, JSON checked with json_valid); regex checks ->
-- length() + GLOB; sequences -> one-row counter tables the application advances with
-- UPDATE ... RETURNING (a grant's id inside the grant's transaction; a block of consumption ids
-- in a transaction of its own, as nextval does).
--
-- Every user-owned table carries user_id and it leads its primary and unique keys, so the tables
-- can be distributed by user_id later without a redesign. CHECK constraints make impossible
-- balances (negative, or more used than granted) unrepresentable in the database itself: the
-- batch writer writes deltas, and a delta that would break a balance fails its batch instead of
-- corrupting it.

-- Billable actions and what they cost. Consumption records snapshot credits_cost and version.
-- (NOT NULL is explicit: a non-INTEGER PRIMARY KEY in SQLite accepts NULL otherwise.)
CREATE TABLE action_prices (
    action_key   TEXT NOT NULL PRIMARY KEY CHECK (length(action_key) BETWEEN 1 AND 64 AND action_key NOT GLOB '*[^a-z0-9_.-]*'),
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    description  TEXT CHECK (length(description) <= 1024),
    credits_cost INTEGER NOT NULL CHECK (credits_cost >= 0),
    enabled      INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    version      INTEGER NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

-- Packages operators sell or give away. The 2 x 2 of limited/unlimited and expiring/non-expiring
-- is enforced by packages_shape. AUTOINCREMENT: ids are never reused.
CREATE TABLE packages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    description         TEXT CHECK (length(description) <= 1024),
    package_type        TEXT NOT NULL CHECK (package_type IN ('credits', 'hybrid', 'duration', 'permanent')),
    credits_amount      INTEGER CHECK (credits_amount > 0),
    duration_days       INTEGER CHECK (duration_days > 0),
    price_cents         INTEGER NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    currency            TEXT NOT NULL DEFAULT 'CNY' CHECK (length(currency) = 3 AND currency NOT GLOB '*[^A-Z]*'),
    priority            INTEGER NOT NULL DEFAULT 100,
    visible             INTEGER NOT NULL DEFAULT 1 CHECK (visible IN (0, 1)),
    assign_to_new_users INTEGER NOT NULL DEFAULT 0 CHECK (assign_to_new_users IN (0, 1)),
    sort_order          INTEGER NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    deleted_at          TEXT,
    CONSTRAINT packages_shape CHECK (
        (package_type = 'credits'   AND credits_amount IS NOT NULL AND duration_days IS NULL) OR
        (package_type = 'hybrid'    AND credits_amount IS NOT NULL AND duration_days IS NOT NULL) OR
        (package_type = 'duration'  AND credits_amount IS NULL     AND duration_days IS NOT NULL) OR
        (package_type = 'permanent' AND credits_amount IS NULL     AND duration_days IS NULL)
    )
);

-- A user's grant of a package. For a limited grant the balance identity
-- total = used + remaining + expired always holds, where used is net of refunds
-- (allocations minus refunded) and expired is what expiry or revocation voided.
-- An unlimited grant keeps total = remaining = expired = 0 and counts its usage in used.
--
-- Stands in for Postgres' user_packages_id_seq: one row, advanced with
-- UPDATE user_packages_id_seq SET last_value = last_value + 1 RETURNING last_value
-- in the inserting transaction. Ids are shared across users, as with the sequence.
CREATE TABLE user_packages_id_seq (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    last_value INTEGER NOT NULL
);
INSERT INTO user_packages_id_seq (id, last_value) VALUES (1, 0);

CREATE TABLE user_packages (
    user_id           INTEGER NOT NULL CHECK (user_id > 0),
    id                INTEGER NOT NULL,
    package_id        INTEGER NOT NULL REFERENCES packages (id),
    source            TEXT NOT NULL CHECK (source IN ('purchase', 'gift', 'promotion', 'system')),
    status            TEXT NOT NULL CHECK (status IN ('pending', 'active', 'depleted', 'expired', 'revoked')),
    priority          INTEGER NOT NULL,
    unlimited         INTEGER NOT NULL CHECK (unlimited IN (0, 1)),
    total_credits     INTEGER NOT NULL CHECK (total_credits >= 0),
    used_credits      INTEGER NOT NULL DEFAULT 0 CHECK (used_credits >= 0),
    remaining_credits INTEGER NOT NULL CHECK (remaining_credits >= 0),
    expired_credits   INTEGER NOT NULL DEFAULT 0 CHECK (expired_credits >= 0),
    -- Copied from the package when assigned, so activating later does not depend on later edits.
    duration_days     INTEGER CHECK (duration_days > 0),
    activated_at      TEXT,
    expires_at        TEXT,
    external_ref      TEXT CHECK (length(external_ref) BETWEEN 1 AND 128),
    note              TEXT CHECK (length(note) <= 1024),
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    PRIMARY KEY (user_id, id),
    CONSTRAINT user_packages_external_ref UNIQUE (user_id, external_ref),
    CONSTRAINT user_packages_used_le_total CHECK (unlimited OR used_credits <= total_credits),
    CONSTRAINT user_packages_balance CHECK (unlimited OR used_credits + remaining_credits + expired_credits = total_credits),
    CONSTRAINT user_packages_unlimited_shape CHECK (NOT unlimited OR (total_credits = 0 AND remaining_credits = 0 AND expired_credits = 0)),
    CONSTRAINT user_packages_activated CHECK (status NOT IN ('active', 'depleted') OR activated_at IS NOT NULL)
);
-- Admin routes address a grant by its id alone; ids come from one sequence, so they are unique.
CREATE INDEX user_packages_by_id ON user_packages (id);
CREATE INDEX user_packages_by_package ON user_packages (package_id, user_id);
-- The supervisor's expiry schedule reads upcoming expiries of live grants.
CREATE INDEX user_packages_live_expiry ON user_packages (expires_at) WHERE status IN ('active', 'depleted');

-- One row per acknowledged deduction. Ids are handed out by the batch writer in blocks
-- (consumption_id_blocks), so a batch knows every id before it inserts.
--
-- Stands in for Postgres' consumption_id_blocks sequence: one row, advanced with
-- UPDATE consumption_id_blocks SET last_value = last_value + 1 RETURNING last_value
-- (each value is a block of 1024 ids).
CREATE TABLE consumption_id_blocks (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    last_value INTEGER NOT NULL
);
INSERT INTO consumption_id_blocks (id, last_value) VALUES (1, 0);

CREATE TABLE consumption_records (
    user_id             INTEGER NOT NULL CHECK (user_id > 0),
    id                  INTEGER NOT NULL,
    action_key          TEXT NOT NULL,
    quantity            INTEGER NOT NULL CHECK (quantity > 0),
    unit_cost           INTEGER NOT NULL CHECK (unit_cost >= 0),
    credits_cost        INTEGER NOT NULL CHECK (credits_cost >= 0),
    price_version       INTEGER NOT NULL CHECK (price_version >= 1),
    idempotency_key     TEXT CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    -- sha-256 of the request's canonical form: the same key with another request is a conflict.
    request_fingerprint TEXT NOT NULL,
    -- The user's remaining credits right after this deduction: part of the original answer
    -- that a replay returns.
    remaining_after     INTEGER NOT NULL CHECK (remaining_after >= 0),
    status              TEXT NOT NULL DEFAULT 'completed' CHECK (status IN ('completed', 'refunded')),
    refunded_credits    INTEGER NOT NULL DEFAULT 0 CHECK (refunded_credits >= 0),
    forfeited_credits   INTEGER NOT NULL DEFAULT 0 CHECK (forfeited_credits >= 0),
    refund_reason       TEXT CHECK (length(refund_reason) <= 1024),
    refunded_at         TEXT,
    metadata            TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at          TEXT NOT NULL,
    PRIMARY KEY (user_id, id),
    CONSTRAINT consumption_records_idempotency UNIQUE (user_id, idempotency_key),
    CONSTRAINT consumption_records_cost CHECK (credits_cost = unit_cost * quantity),
    CONSTRAINT consumption_records_refund_le_cost CHECK (refunded_credits + forfeited_credits <= credits_cost),
    CONSTRAINT consumption_records_refund_shape CHECK (
        (status = 'completed' AND refunded_credits = 0 AND forfeited_credits = 0 AND refunded_at IS NULL) OR
        (status = 'refunded' AND refunded_at IS NOT NULL)
    )
);
CREATE INDEX consumption_records_by_id ON consumption_records (id);
CREATE INDEX consumption_records_by_time ON consumption_records (created_at, id);

-- Which grant paid how much of a deduction, and what of it came back (refunded) or was void
-- because the grant had expired by the time of the refund (forfeited).
-- No foreign keys (postgres 0002): they cost ~60% of the hot allocation insert, and what they
-- guaranteed holds by construction and is checked by reconciliation (kind `allocation`).
CREATE TABLE consumption_allocations (
    user_id           INTEGER NOT NULL,
    consumption_id    INTEGER NOT NULL,
    user_package_id   INTEGER NOT NULL,
    credits           INTEGER NOT NULL CHECK (credits > 0),
    refunded_credits  INTEGER NOT NULL DEFAULT 0 CHECK (refunded_credits >= 0),
    forfeited_credits INTEGER NOT NULL DEFAULT 0 CHECK (forfeited_credits >= 0),
    PRIMARY KEY (user_id, consumption_id, user_package_id),
    CONSTRAINT consumption_allocations_le_credits CHECK (refunded_credits + forfeited_credits <= credits)
);
CREATE INDEX consumption_allocations_by_grant ON consumption_allocations (user_id, user_package_id);

-- The audit log. user_id is empty for catalog events (a price change belongs to no user).
-- AUTOINCREMENT: event ids are never reused, even after the newest rows are deleted.
CREATE TABLE billing_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 64 AND kind NOT GLOB '*[^a-z_]*'),
    user_id    INTEGER CHECK (user_id > 0),
    payload    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(payload)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE INDEX billing_events_by_time ON billing_events (created_at, id);
CREATE INDEX billing_events_by_user ON billing_events (user_id, id);

-- Users the host application has announced as registered: new-user packages are assigned once.
-- WITHOUT ROWID: as a rowid table, INTEGER PRIMARY KEY would turn a NULL user_id into a fresh
-- rowid instead of rejecting it.
CREATE TABLE user_registrations (
    user_id       INTEGER NOT NULL PRIMARY KEY CHECK (user_id > 0),
    registered_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
) WITHOUT ROWID;

-- Defaults of a new database.
INSERT INTO action_prices (action_key, name, description, credits_cost) VALUES
    ('resume_optimize',   'Resume optimization', 'AI polishing of a resume',       1),
    ('ai_chat',           'AI chat',             'One AI chat conversation turn',  1),
    ('pdf_export',        'PDF export',          'Export a document as PDF',       1),
    ('advanced_analysis', 'Advanced analysis',   'In-depth AI analysis',           3);

INSERT INTO packages (name, description, package_type, credits_amount, duration_days, assign_to_new_users, sort_order) VALUES
    ('New user trial',     'Trial credits for every new user', 'hybrid', 10,  30, true,  0),
    ('Monthly membership', '100 credits valid for 30 days',    'hybrid', 100, 30, false, 1);

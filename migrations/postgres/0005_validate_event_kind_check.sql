-- Checks the existing audit rows against 0004's kind check. VALIDATE takes a SHARE UPDATE
-- EXCLUSIVE lock, which lets inserts go on while it scans; it is a migration of its own
-- because sqlx runs each migration in one transaction, and 0004's lock would otherwise be
-- held through the scan.
ALTER TABLE billing_events VALIDATE CONSTRAINT billing_events_kind_check;

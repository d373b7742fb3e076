-- consumption_allocations loses its two foreign keys. Each was a per-row trigger on the
-- hottest insert of the deduct path (two index probes and a FOR KEY SHARE row lock on the grant
-- the same batch updates): measured at about 60% of that statement's time.
--
-- What they guaranteed still holds by construction and is still checked:
-- - the batch writer is the only writer of allocations, and inserts them only for consumption
--   records inserted by the same statement batch, in the same transaction, naming grants the
--   wallet holds (and grants are never deleted);
-- - reconciliation reports any allocation whose consumption record or grant is missing
--   (kind `allocation`), next to the ledger and wallet checks.
ALTER TABLE consumption_allocations
    DROP CONSTRAINT consumption_allocations_user_id_consumption_id_fkey,
    DROP CONSTRAINT consumption_allocations_user_id_user_package_id_fkey;

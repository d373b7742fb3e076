-- The batch writer writes a batch of deductions and refunds in one statement
-- (src/store/postgres/batch.rs). Inside it, this check fails the whole statement when a row the
-- batch meant to update was not there (a refund of a consumption that is no longer completed,
-- a grant that does not exist), so a refused batch has written nothing and its wallets reload.
CREATE FUNCTION credits_batch_check(ok boolean, failure text) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'batch writer invariant: %', failure;
    END IF;
    RETURN true;
END
$$;

-- The last garbage collection run and the last successful one, whichever
-- process ran them (`garret gc` as a CronJob, or `serve`'s periodic GC), so
-- that every replica's /metrics reports them.
CREATE TABLE gc_runs (
    outcome     TEXT    PRIMARY KEY CHECK (outcome IN ('last', 'last_success')),
    finished_at BIGINT  NOT NULL,
    succeeded   BOOLEAN NOT NULL,
    -- The run's report as JSON; NULL when the run failed before it had one.
    report      TEXT
);

-- One row per read (flattened access patterns) for BI tools. LocalDuckDBSink creates this view
-- in every local store from this file (loaded by analyzers/sinks/views.py).
-- The lists are unnested in the SELECT lists of nested queries, not as lateral joins in FROM
-- (`FROM decisions d, UNNEST(d.data_accessed) ..., UNNEST(da.access_patterns) ...`): DuckDB
-- 2.0 sizes the lateral form's buffers by the longest list, so over decisions of 10,000 reads
-- a count took 19-25 s and ran out of 512 MiB (or took 19 GB with DuckDB's default limit)
-- where this form takes 0.3 s in under 128 MiB (docs/benchmarks.md, ninth pass). Same columns,
-- same rows. `bar_time` is the decision's bar time, `read_bar_time` that of the bar read.
CREATE OR REPLACE VIEW decision_reads AS
SELECT decision_id, session_id, agent_id, decision_point, bar_time, stage, action,
       da.symbol AS symbol, ap.seq AS seq, ap.field AS field, ap."index" AS "index",
       ap.size AS size, ap.bar_index AS bar_index, ap.data_hash AS data_hash,
       ap.value AS value, ap.text_value AS text_value, ap.lookahead AS lookahead,
       ap.bar_time AS read_bar_time
FROM (
    SELECT decision_id, session_id, agent_id, decision_point, bar_time, stage, action, da,
           unnest(da.access_patterns) AS ap
    FROM (
        SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage,
               d.action, unnest(d.data_accessed) AS da
        FROM decisions d
    )
)

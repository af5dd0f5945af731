-- One row per read (flattened access patterns) for BI tools. LocalDuckDBSink creates this view
-- in every local store from this file (loaded by analyzers/sinks/views.py).
CREATE OR REPLACE VIEW decision_reads AS
SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage, d.action,
       da.symbol, ap.seq, ap.field, ap."index", ap.size, ap.bar_index, ap.data_hash, ap.value,
       ap.text_value, ap.lookahead
FROM decisions d, UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)

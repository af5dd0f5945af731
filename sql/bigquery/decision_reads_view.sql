-- One row per read (flattened access patterns) for BI tools. BigQuerySink creates this view
-- next to its table at start from this file (analyzers/sinks/views.py puts its table in place
-- of fmel.decisions); run it by hand for another dataset. `bar_time` is the decision's bar
-- time, `read_bar_time` that of the bar read.
CREATE OR REPLACE VIEW fmel.decision_reads AS
SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage, d.action,
       da.symbol, ap.seq, ap.field, ap.`index`, ap.size, ap.bar_index, ap.data_hash, ap.value,
       ap.text_value, ap.lookahead, ap.bar_time AS read_bar_time
FROM fmel.decisions AS d, UNNEST(d.data_accessed) AS da, UNNEST(da.access_patterns) AS ap

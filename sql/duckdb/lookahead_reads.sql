-- Look-ahead flags: every read of a future bar (positive index), with the decision it was made
-- in and the bar it reached. Empty for an agent that never peeks.
-- Over the decision_reads view (one row per read; see decision_reads_view.sql).
SELECT
  r.session_id,
  r.decision_id,
  r.decision_point,
  r.bar_time,
  r.action,
  r.symbol,
  r.field,
  r."index" AS bars_ahead,
  r.bar_index,
  r.data_hash,
  r.value
FROM decision_reads AS r
WHERE r.lookahead
ORDER BY r.session_id, r.decision_point, r.seq

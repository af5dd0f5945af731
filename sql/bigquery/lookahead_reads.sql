-- Look-ahead flags: every read of a future bar (positive index), with the decision it was made
-- in and the bar it reached. Empty for an agent that never peeks.
SELECT
  d.session_id,
  d.decision_id,
  d.decision_point,
  d.bar_time,
  d.action,
  da.symbol,
  ap.field,
  ap.`index` AS bars_ahead,
  ap.bar_index,
  ap.data_hash,
  ap.value
FROM fmel.decisions AS d, UNNEST(d.data_accessed) AS da, UNNEST(da.access_patterns) AS ap
WHERE d.lookahead_reads > 0 AND ap.lookahead
ORDER BY d.session_id, d.decision_point, ap.seq

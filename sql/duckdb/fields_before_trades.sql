-- Which fields the agent read in the decision that placed each BUY/SELL: one row per
-- (decision, symbol, field) with the number of reads, the deepest bar reached back (0 = the
-- current bar only) and the newest value read.
-- Over the decision_reads view (one row per read): unnesting the lists here as lateral joins
-- is slow on wide decisions (see decision_reads_view.sql).
SELECT
  r.session_id,
  r.decision_id,
  r.decision_point,
  r.bar_time,
  r.action,
  r.symbol,
  r.field,
  count(*) AS reads,
  max(r.size - 1 - r."index") AS deepest_lookback_bars,
  arg_max(r.value, r.seq) AS last_value
FROM decision_reads AS r
WHERE r.action IN ('BUY', 'SELL', 'BUY+SELL')
GROUP BY r.session_id, r.decision_id, r.decision_point, r.bar_time, r.action, r.symbol, r.field
ORDER BY r.session_id, r.decision_point, r.symbol, r.field

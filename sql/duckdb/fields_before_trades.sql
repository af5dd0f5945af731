-- Which fields the agent read in the decision that placed each BUY/SELL: one row per
-- (decision, symbol, field) with the number of reads, the deepest bar reached back (0 = the
-- current bar only) and the newest value read.
SELECT
  d.session_id,
  d.decision_id,
  d.decision_point,
  d.bar_time,
  d.action,
  da.symbol,
  ap.field,
  count(*) AS reads,
  max(ap.size - 1 - ap."index") AS deepest_lookback_bars,
  arg_max(ap.value, ap.seq) AS last_value
FROM decisions AS d, UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)
WHERE d.action IN ('BUY', 'SELL', 'BUY+SELL')
GROUP BY d.session_id, d.decision_id, d.decision_point, d.bar_time, d.action, da.symbol, ap.field
ORDER BY d.session_id, d.decision_point, da.symbol, ap.field

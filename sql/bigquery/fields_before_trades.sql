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
  COUNT(*) AS reads,
  MAX(ap.size - 1 - ap.`index`) AS deepest_lookback_bars,
  ARRAY_AGG(ap.value ORDER BY ap.seq DESC LIMIT 1)[OFFSET(0)] AS last_value
FROM fmel.decisions AS d, UNNEST(d.data_accessed) AS da, UNNEST(da.access_patterns) AS ap
WHERE d.action IN ('BUY', 'SELL', 'BUY+SELL')
GROUP BY d.session_id, d.decision_id, d.decision_point, d.bar_time, d.action, da.symbol, ap.field
ORDER BY d.session_id, d.decision_point, da.symbol, ap.field

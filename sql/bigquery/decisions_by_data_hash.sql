-- Which decisions saw this bar? Every decision that read the bar with the given data hash
-- (reads = how many reads reached it) or had it as its symbol's current bar (current_bar).
-- Parameter: data_hash (STRING; the emulator takes a parameter name in a comment for a use).
WITH target AS (SELECT @data_hash AS h)
SELECT
  d.session_id,
  d.decision_id,
  d.decision_point,
  d.bar_time,
  d.action,
  da.symbol,
  da.data_hash = t.h AS current_bar,
  (SELECT COUNT(*) FROM UNNEST(da.access_patterns) AS ap WHERE ap.data_hash = t.h) AS reads
FROM fmel.decisions AS d, UNNEST(d.data_accessed) AS da, target AS t
WHERE da.data_hash = t.h
   OR EXISTS (SELECT 1 FROM UNNEST(da.access_patterns) AS ap WHERE ap.data_hash = t.h)
ORDER BY d.session_id, d.decision_point, da.symbol

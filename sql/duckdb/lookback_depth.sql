-- How far back agents look: reads per lookback depth (bars behind the current one reached by
-- the read; a window read get(size=N) at index i reaches N - 1 - i bars back). Look-ahead reads
-- are left out (see lookahead_reads.sql).
SELECT
  d.session_id,
  ap.size - 1 - ap."index" AS depth_bars,
  count(*) AS reads,
  count(DISTINCT d.decision_id) AS decisions
FROM decisions AS d, UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)
WHERE NOT ap.lookahead
GROUP BY d.session_id, depth_bars
ORDER BY d.session_id, depth_bars

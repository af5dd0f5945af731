-- How far back agents look: reads per lookback depth (bars behind the current one reached by
-- the read; a window read get(size=N) at index i reaches N - 1 - i bars back). Look-ahead reads
-- are left out (see lookahead_reads.sql).
-- Over the decision_reads view (one row per read; see decision_reads_view.sql).
SELECT
  r.session_id,
  r.size - 1 - r."index" AS depth_bars,
  count(*) AS reads,
  count(DISTINCT r.decision_id) AS decisions
FROM decision_reads AS r
WHERE NOT r.lookahead
GROUP BY r.session_id, depth_bars
ORDER BY r.session_id, depth_bars

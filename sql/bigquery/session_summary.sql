-- Per session: how many decisions, over which bars, what the agent did and read, and the
-- portfolio value at its first and last decision (USD).
SELECT
  session_id,
  agent_id,
  mode,
  COUNT(*) AS decisions,
  MIN(bar_time) AS first_bar,
  MAX(bar_time) AS last_bar,
  SUM(IF(action = 'BUY', 1, 0)) AS buy_decisions,
  SUM(IF(action = 'SELL', 1, 0)) AS sell_decisions,
  SUM(IF(action = 'HOLD', 1, 0)) AS hold_decisions,
  SUM((SELECT COUNT(*) FROM UNNEST(actions) AS a WHERE a.event = 'CREATED')) AS orders_created,
  SUM((SELECT COUNT(*) FROM UNNEST(actions) AS a WHERE a.event = 'COMPLETED')) AS orders_filled,
  SUM(reads) AS reads,
  SUM(lookahead_reads) AS lookahead_reads,
  ARRAY_AGG(portfolio_value ORDER BY decision_point LIMIT 1)[OFFSET(0)] AS first_value_usd,
  ARRAY_AGG(portfolio_value ORDER BY decision_point DESC LIMIT 1)[OFFSET(0)] AS last_value_usd
FROM fmel.decisions
GROUP BY session_id, agent_id, mode
ORDER BY first_bar, session_id

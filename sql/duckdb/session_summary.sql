-- Per session: how many decisions, over which bars, what the agent did and read, and the
-- portfolio value at its first and last decision (USD).
SELECT
  session_id,
  agent_id,
  mode,
  count(*) AS decisions,
  min(bar_time) AS first_bar,
  max(bar_time) AS last_bar,
  count(*) FILTER (WHERE action = 'BUY') AS buy_decisions,
  count(*) FILTER (WHERE action = 'SELL') AS sell_decisions,
  count(*) FILTER (WHERE action = 'HOLD') AS hold_decisions,
  sum((SELECT count(*) FROM unnest(actions) AS t(a) WHERE a.event = 'CREATED'))
    AS orders_created,
  sum((SELECT count(*) FROM unnest(actions) AS t(a) WHERE a.event = 'COMPLETED'))
    AS orders_filled,
  sum(reads) AS reads,
  sum(lookahead_reads) AS lookahead_reads,
  arg_min(portfolio_value, decision_point) AS first_value_usd,
  arg_max(portfolio_value, decision_point) AS last_value_usd
FROM decisions
GROUP BY session_id, agent_id, mode
ORDER BY first_bar, session_id

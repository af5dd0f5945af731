-- What became of each order: the decision that created it (CREATED action) joined by order_ref
-- with the events of later decisions of the same session. final_status is the last event;
-- filled_size (shares/units), avg_fill_price (USD) and commission_usd add up its fills.
WITH created AS (
  SELECT d.session_id, d.decision_id, d.decision_point, d.bar_time, a.order_ref, a.symbol,
         a.side, a.order_type, a.size, a.price
  FROM fmel.decisions AS d, UNNEST(d.actions) AS a
  WHERE a.event = 'CREATED'
),
events AS (
  SELECT d.session_id, d.decision_point, d.bar_time, a.seq, a.order_ref, a.event, a.exec_size,
         a.exec_price, a.commission
  FROM fmel.decisions AS d, UNNEST(d.actions) AS a
  WHERE a.event NOT IN ('CREATED', 'CANCEL_REQUEST')
)
SELECT
  c.session_id,
  c.decision_id,
  c.decision_point,
  c.bar_time,
  c.order_ref,
  c.symbol,
  c.side,
  c.order_type,
  c.size,
  c.price,
  ARRAY_AGG(e.event ORDER BY e.decision_point DESC, e.seq DESC LIMIT 1)[SAFE_OFFSET(0)]
    AS final_status,
  MAX(IF(e.event IN ('COMPLETED', 'PARTIAL'), e.decision_point, NULL)) AS last_fill_decision_point,
  COALESCE(SUM(IF(e.event IN ('COMPLETED', 'PARTIAL'), e.exec_size, NULL)), 0) AS filled_size,
  SAFE_DIVIDE(SUM(IF(e.event IN ('COMPLETED', 'PARTIAL'), e.exec_size * e.exec_price, NULL)),
              SUM(IF(e.event IN ('COMPLETED', 'PARTIAL'), e.exec_size, NULL))) AS avg_fill_price,
  COALESCE(SUM(IF(e.event IN ('COMPLETED', 'PARTIAL'), e.commission, NULL)), 0) AS commission_usd
FROM created AS c
LEFT JOIN events AS e
  ON e.session_id = c.session_id AND e.order_ref = c.order_ref
 AND e.decision_point >= c.decision_point
GROUP BY c.session_id, c.decision_id, c.decision_point, c.bar_time, c.order_ref, c.symbol,
         c.side, c.order_type, c.size, c.price
ORDER BY c.session_id, c.decision_point, c.order_ref

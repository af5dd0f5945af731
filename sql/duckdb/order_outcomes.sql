-- What became of each order: the decision that created it (CREATED action) joined by order_ref
-- with the events of later decisions of the same session. final_status is the last event;
-- filled_size (shares/units), avg_fill_price (USD) and commission_usd add up its fills.
WITH created AS (
  SELECT d.session_id, d.decision_id, d.decision_point, d.bar_time, a.order_ref, a.symbol,
         a.side, a.order_type, a.size, a.price
  FROM decisions AS d, UNNEST(d.actions) AS t(a)
  WHERE a.event = 'CREATED'
),
events AS (
  SELECT d.session_id, d.decision_point, d.bar_time, a.seq, a.order_ref, a.event, a.exec_size,
         a.exec_price, a.commission
  FROM decisions AS d, UNNEST(d.actions) AS t(a)
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
  arg_max(e.event, (e.decision_point, e.seq)) AS final_status,
  max(e.decision_point) FILTER (WHERE e.event IN ('COMPLETED', 'PARTIAL'))
    AS last_fill_decision_point,
  coalesce(sum(e.exec_size) FILTER (WHERE e.event IN ('COMPLETED', 'PARTIAL')), 0)
    AS filled_size,
  sum(e.exec_size * e.exec_price) FILTER (WHERE e.event IN ('COMPLETED', 'PARTIAL'))
    / nullif(sum(e.exec_size) FILTER (WHERE e.event IN ('COMPLETED', 'PARTIAL')), 0)
    AS avg_fill_price,
  coalesce(sum(e.commission) FILTER (WHERE e.event IN ('COMPLETED', 'PARTIAL')), 0)
    AS commission_usd
FROM created AS c
LEFT JOIN events AS e
  ON e.session_id = c.session_id AND e.order_ref = c.order_ref
 AND e.decision_point >= c.decision_point
GROUP BY c.session_id, c.decision_id, c.decision_point, c.bar_time, c.order_ref, c.symbol,
         c.side, c.order_type, c.size, c.price
ORDER BY c.session_id, c.decision_point, c.order_ref

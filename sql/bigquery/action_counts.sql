-- What happened, counted per session: decisions by their action summary (kind = 'decision':
-- HOLD, BUY, SELL, BUY+SELL, CANCEL) and order events by type and side (kind = 'order_event':
-- CREATED, SUBMITTED, ACCEPTED, COMPLETED, CANCELED, MARGIN, REJECTED, ...).
SELECT session_id, 'decision' AS kind, action AS name, CAST(NULL AS STRING) AS side,
       COUNT(*) AS n
FROM fmel.decisions
GROUP BY session_id, action
UNION ALL
SELECT d.session_id, 'order_event' AS kind, a.event AS name, a.side, COUNT(*) AS n
FROM fmel.decisions AS d, UNNEST(d.actions) AS a
GROUP BY d.session_id, a.event, a.side
ORDER BY session_id, kind, name, side

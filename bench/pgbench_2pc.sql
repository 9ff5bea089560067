-- pgbench script (-M simple) for bench/orders.py: the shop's two-phase commit, statement for statement,
-- one statement per round trip (the limit issue 11 measures the shop against).
-- pgbench substitutes :var outside quoted literals only, so ids are SQL expressions and the
-- quoted gids for PREPARE/COMMIT PREPARED come back (\gset) from the stock statement, which
-- the shop sends too: no extra round trip. RUN: becomes the run's name (no key collisions).
\set pid random(1, 1000)
\set n random(1, 9000000000000000000)
BEGIN;
WITH taken AS (UPDATE products SET stock = stock - 1, updated_at = now() WHERE id = :pid AND stock >= 1 RETURNING id, price_cents) INSERT INTO stock_movements (order_id, product_id, delta) SELECT md5('RUN:' || :client_id || ':' || :n)::uuid, id, -1 FROM taken RETURNING (SELECT price_cents FROM taken), quote_literal('RUN:' || :client_id || ':' || :n || ':inventory') AS gid_inv, quote_literal('RUN:' || :client_id || ':' || :n || ':orders') AS gid_ord \gset
PREPARE TRANSACTION :gid_inv;
BEGIN;
INSERT INTO orders (id, idempotency_key, request_hash, product_id, quantity, customer, address, unit_price_cents, total_cents, gid) VALUES (md5('RUN:' || :client_id || ':' || :n)::uuid, 'RUN:' || :client_id || ':' || :n, 'h', :pid, 1, 'bench', '1 Loopback Road', 100, 100, 'RUN:' || :client_id || ':' || :n) RETURNING id, created_at;
PREPARE TRANSACTION :gid_ord;
INSERT INTO tx_decisions (gid, decision, decided_by) VALUES ('RUN:' || :client_id || ':' || :n, 'commit', 'pgbench') ON CONFLICT (gid) DO NOTHING RETURNING decision;
COMMIT PREPARED :gid_inv;
COMMIT PREPARED :gid_ord;

-- pgbench script (-M simple) for bench/orders.py: the shop's two-phase commit as the shop now
-- sends it, in four round trips (`\;` joins statements into one query, as the shop does):
-- [BEGIN; stock; PREPARE] [BEGIN; order; PREPARE; decision] [COMMIT PREPARED] [COMMIT PREPARED].
-- In -M simple pgbench substitutes :var inside quoted literals too, so the gids are written out.
-- RUN: becomes the run's name (no key collisions between runs).
\set pid random(1, 1000)
\set n random(1, 9000000000000000000)
BEGIN \; WITH taken AS (UPDATE products SET stock = stock - 1, updated_at = now() WHERE id = :pid AND stock >= 1 RETURNING id, price_cents) INSERT INTO stock_movements (order_id, product_id, delta) SELECT md5('RUN:' || :client_id || ':' || :n)::uuid, id, -1 FROM taken RETURNING (SELECT price_cents FROM taken) \; PREPARE TRANSACTION 'RUN:-:client_id-:n-inventory';
BEGIN \; INSERT INTO orders (id, idempotency_key, request_hash, product_id, quantity, customer, address, unit_price_cents, total_cents, gid) VALUES (md5('RUN:' || :client_id || ':' || :n)::uuid, 'RUN:' || :client_id || ':' || :n, 'h', :pid, 1, 'bench', '1 Loopback Road', 100, 100, 'RUN:' || :client_id || ':' || :n) RETURNING id, created_at \; PREPARE TRANSACTION 'RUN:-:client_id-:n-orders' \; INSERT INTO tx_decisions (gid, decision, decided_by) VALUES ('RUN:' || :client_id || ':' || :n, 'commit', 'pgbench') ON CONFLICT (gid) DO NOTHING RETURNING decision;
COMMIT PREPARED 'RUN:-:client_id-:n-inventory';
COMMIT PREPARED 'RUN:-:client_id-:n-orders';

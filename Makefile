# The two commands a new machine needs: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test check bench bench-orders bench-catalog bench-controlplane bench-failover bench-hang bench-restore down

DATA_DIR ?= .lab
BASE_PORT ?= 25400

setup:
	@scripts/setup

demo: setup
	.venv/bin/controlplane demo --data-dir $(DATA_DIR) --base-port $(BASE_PORT)

down:
	.venv/bin/controlplane down --data-dir $(DATA_DIR)

test: setup
	scripts/check

bench:
	@SETUP_BENCH=1 scripts/setup
	$(MAKE) bench-orders bench-catalog bench-controlplane bench-failover bench-hang bench-restore

bench-controlplane:
	.venv/bin/python bench/controlplane.py

bench-failover:
	.venv/bin/python bench/failover.py --trials 12

bench-hang:
	.venv/bin/python bench/hang.py

bench-restore:
	.venv/bin/python bench/restore.py --trials 5

bench-orders:
	.venv/bin/python bench/orders.py --clients 16 --duration-s 20 --repeats 3

bench-catalog:
	.venv/bin/python bench/catalog.py --connections 16 --duration-s 10 --repeats 3

# The two commands a new machine needs: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test check bench bench-orders bench-catalog bench-controlplane bench-failover bench-hang bench-restore bench-flood bench-scale bench-dashboard bench-persist bench-ssh bench-hosts down

DATA_DIR ?= .lab
BASE_PORT ?= 25400

setup:
	@scripts/setup

demo: setup
	.venv/bin/shoplab demo --data-dir $(DATA_DIR) --base-port $(BASE_PORT)

down:
	.venv/bin/shoplab down --data-dir $(DATA_DIR)

test: setup
	scripts/check

# Every benchmark, one after the other (~1 h), on one commit, then one table of each figure
# against bench/goals.toml (also written to $(FIGURES)/TABLE.md, which bench/RESULTS.md pastes
# whole). A benchmark that fails does not stop the others; the table names it. The run's
# status is the table's: non-zero when any goal is missed or has no figure.
FIGURES ?= bench/out

bench:
	@SETUP_BENCH=1 scripts/setup
	rm -rf $(FIGURES) && mkdir -p $(FIGURES)
	.venv/bin/python -m lab.bench_goals --start $(FIGURES)
	-$(MAKE) -k bench-orders bench-catalog bench-controlplane bench-failover bench-hang bench-persist bench-restore bench-flood bench-scale bench-dashboard bench-ssh bench-hosts
	.venv/bin/python -m lab.bench_goals $(FIGURES)

bench-flood:
	.venv/bin/python bench/flood.py --every-s 1 --figures $(FIGURES)/flood.json

bench-controlplane:
	.venv/bin/python bench/controlplane.py --figures $(FIGURES)/controlplane.json

bench-failover:
	.venv/bin/python bench/failover.py --trials 12 --figures $(FIGURES)/failover.json

bench-hang:
	.venv/bin/python bench/hang.py --figures $(FIGURES)/hang.json

bench-persist:
	.venv/bin/python bench/persist.py --trials 3 --kills 5 --every-s 35 --figures $(FIGURES)/persist.json

bench-restore:
	.venv/bin/python bench/restore.py --trials 5 --figures $(FIGURES)/restore.json

bench-scale:
	.venv/bin/python bench/scale.py --sizes 10,100,1000 --runner asyncio,apscheduler --figures $(FIGURES)/scale.json --html $(FIGURES)/scale.html

bench-orders:
	.venv/bin/python bench/orders.py --clients 16 --duration-s 20 --repeats 3 --figures $(FIGURES)/orders.json

bench-dashboard:
	.venv/bin/python bench/dashboard.py --clients 50 --figures $(FIGURES)/dashboard.json

bench-ssh:
	.venv/bin/python bench/ssh.py --steps 200 --figures $(FIGURES)/ssh.json

bench-hosts:
	.venv/bin/python bench/hosts.py --kills 5 --partitions 3 --figures $(FIGURES)/hosts.json

bench-catalog:
	.venv/bin/python bench/catalog.py --connections 16 --duration-s 10 --repeats 3 --figures $(FIGURES)/catalog.json

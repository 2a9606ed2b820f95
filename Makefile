# edgekit: the two commands of the README, and a few more.
.PHONY: setup demo demo-host test test-fast bench clean

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/edgekit demo

demo-host: setup
	.venv/bin/edgekit demo --board host

test: setup
	./scripts/test.sh

test-fast: setup
	./scripts/test.sh -m "not slow"

bench: setup
	.venv/bin/python bench/run_all.py

clean:
	rm -rf runs .pytest_cache

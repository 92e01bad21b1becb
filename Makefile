# The commands the README names.
.PHONY: demo test setup build release lint fmt bench

demo:
	cargo run --release -- demo

setup:
	bash scripts/setup.sh

test: setup
	cargo test --locked

build:
	cargo build --locked

release:
	cargo build --release --locked

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all

bench: release
	bash bench/run.sh plain

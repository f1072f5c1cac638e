# cyrnel build entry points. `make run` and `make test` work on a fresh
# Debian machine with only the Rust toolchain: missing system build
# dependencies are installed with apt-get when running as root, otherwise the
# exact command to run is printed.

CARGO ?= cargo
CACHE_DIR ?= $(HOME)/.cache/cyrnel
DATA_DIR ?= ./cyrnel-data
LISTEN ?= 127.0.0.1:9371

# RocksDB's C++ takes ~17 minutes to compile on two cores. ccache in front of
# the C/C++ compiler turns rebuilds of unchanged RocksDB sources into cache
# hits (the cc crate honours CC/CXX wrappers). Expanded when a recipe runs,
# i.e. after `deps` may have installed ccache.
CARGO_ENV = CCACHE_DIR=$(CACHE_DIR)/ccache CCACHE_BASEDIR=$(CURDIR) \
	$(if $(shell command -v ccache 2>/dev/null),CC="ccache cc" CXX="ccache c++")

APT_PACKAGES = libclang-dev ccache

.PHONY: all run test build deps lint fmt check clean bench

all: build

## deps: install the system packages the build needs (libclang for RocksDB's bindgen, ccache)
deps:
	@missing=""; \
	if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-*.so* /usr/lib/*/libclang-*.so* >/dev/null 2>&1; then missing="$$missing libclang-dev"; fi; \
	if ! command -v ccache >/dev/null 2>&1; then missing="$$missing ccache"; fi; \
	if ! command -v c++ >/dev/null 2>&1; then missing="$$missing g++"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing build dependencies:$$missing"; \
	    echo "install them with:  sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

## build: release build of cyrneld (one profile for running, testing and benchmarking)
build: deps
	$(CARGO_ENV) $(CARGO) build --release --bin cyrneld

## run: build and start the daemon on $(LISTEN) with RocksDB in $(DATA_DIR)
run: deps
	$(CARGO_ENV) $(CARGO) run --release --bin cyrneld -- --listen $(LISTEN) --data-dir $(DATA_DIR)

## lint: formatting and clippy (release profile, to reuse the release build of RocksDB)
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO_ENV) $(CARGO) clippy --release --all-targets -- -D warnings

## test: lint, then every unit and integration test against the real daemon
test: lint
	$(CARGO_ENV) $(CARGO) test --release

## bench: the benchmark harness (release cyrneld against baselines measured in the same run)
bench: deps
	$(CARGO_ENV) $(CARGO) bench --bench bench

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

.PHONY: package test-packages

## package: the .deb and .rpm in packaging/dist/ (cargo-deb and cargo-generate-rpm, installed at pinned versions when missing)
package: deps
	$(CARGO_ENV) CACHE_DIR=$(CACHE_DIR) CARGO=$(CARGO) packaging/build.sh packaging/dist

## test-packages: build both packages, install them into Debian roots (debootstrap, cached under $(CACHE_DIR)) and an rpm root, and check them
test-packages: package
	CACHE_DIR=$(CACHE_DIR) packaging/test-install.sh packaging/dist

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

.PHONY: all run test build deps lint fmt check clean bench fuzz soak promtool previous

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

# promtool (Prometheus' exposition linter, for tests/metrics.rs): the one on
# PATH, else the binary unpacked from Debian's prometheus package into the
# cache dir. Only that file is unpacked: installing the package would add a
# Prometheus server with its service, user and web assets.
PROMTOOL_DIR = $(CACHE_DIR)/prometheus-deb
PROMTOOL = $(or $(shell command -v promtool 2>/dev/null),$(PROMTOOL_DIR)/usr/bin/promtool)

## promtool: make promtool available for the metrics test (unpacked from Debian's prometheus package when missing)
promtool:
	@if [ ! -x "$(PROMTOOL)" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
	    echo "missing promtool: install Prometheus' promtool (Debian: apt-get install prometheus)"; \
	    exit 1; \
	  fi; \
	  echo "unpacking promtool from Debian's prometheus package into $(PROMTOOL_DIR)"; \
	  tmp=$$(mktemp -d) && cd "$$tmp" && \
	  if ! apt-get -q -o APT::Sandbox::User=root download prometheus >/dev/null 2>&1; then \
	    if [ "$$(id -u)" != 0 ]; then \
	      echo "cannot download Debian's prometheus package; as root run:  apt-get update"; \
	      rm -rf "$$tmp"; exit 1; \
	    fi; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    apt-get -q -o APT::Sandbox::User=root download prometheus >/dev/null || { rm -rf "$$tmp"; exit 1; }; \
	  fi; \
	  mkdir -p "$(PROMTOOL_DIR)" && \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x -C "$(PROMTOOL_DIR)" ./usr/bin/promtool; \
	  status=$$?; cd / && rm -rf "$$tmp"; [ $$status = 0 ] || exit 1; \
	fi
	@echo "promtool: $(PROMTOOL)"

# An earlier build, for the upgrade test (tests/it/handover.rs hands over
# from it to this build): the commit below, the last that writes handover
# state version 1 (a development build: no release wrote it), built once
# from `git archive` on a target dir of its own (sharing one would let
# cargo mistake one build's binary for the other's) and kept in the cache
# dir. Its sources are elsewhere, so CCACHE_BASEDIR is set again after
# CARGO_ENV (the later assignment wins).
HANDOVER_BASE = 45a5cc579d545602623cdcdc8641033c1e759989
PREVIOUS_BIN = $(CACHE_DIR)/cyrneld-$(HANDOVER_BASE)

## previous: build the earlier cyrneld of the upgrade test (commit HANDOVER_BASE) into the cache dir, once
previous: deps
	@if [ ! -x "$(PREVIOUS_BIN)" ]; then \
	  git cat-file -e $(HANDOVER_BASE)^{commit} 2>/dev/null || { \
	    echo "the earlier build ($(HANDOVER_BASE)) is not in this checkout's history: run from a git clone"; exit 1; }; \
	  src=$(CACHE_DIR)/previous-src; rm -rf "$$src" && mkdir -p "$$src" && \
	  git archive $(HANDOVER_BASE) | tar -x -C "$$src" && \
	  echo "building the earlier build $(HANDOVER_BASE) (once)" && \
	  (cd "$$src" && $(CARGO_ENV) CCACHE_BASEDIR="$$src" \
	    $(CARGO) build --release --bin cyrneld --target-dir $(CACHE_DIR)/target-previous) && \
	  cp $(CACHE_DIR)/target-previous/release/cyrneld "$(PREVIOUS_BIN).tmp" && \
	  mv "$(PREVIOUS_BIN).tmp" "$(PREVIOUS_BIN)" && rm -rf "$$src"; \
	fi
	@echo "earlier build: $(PREVIOUS_BIN)"

## test: lint, every unit and integration test against the real daemon, then the schemathesis run (fuzz)
test: lint promtool previous
	CYRNEL_TEST_PREVIOUS_CYRNELD="$(PREVIOUS_BIN)" PROMTOOL="$(PROMTOOL)" $(CARGO_ENV) $(CARGO) test --release
	$(MAKE) --no-print-directory fuzz

## bench: the benchmark harness (release cyrneld against baselines measured in the same run)
bench: deps
	$(CARGO_ENV) $(CARGO) bench --bench bench

## soak: 15 minutes of mixed load (BENCH_SOAK_SECS) reporting the daemon's RSS over time; target peak ≤ 64 MB
soak: deps
	BENCH_ONLY=soak $(CARGO_ENV) $(CARGO) bench --bench bench

# Schemathesis (PyPI, pinned) in a virtualenv under the cache dir; a new
# version gets a new virtualenv. Budget and seed are fixed so that runs are
# comparable: one to two minutes on two cores, plus the release build.
SCHEMATHESIS_VERSION = 4.32.5
FUZZ_VENV = $(CACHE_DIR)/venv-schemathesis-$(SCHEMATHESIS_VERSION)
FUZZ_EXAMPLES ?= 100
FUZZ_SEED ?= 1

## fuzz: schemathesis against a live release cyrneld: no 5xx, every response as openapi.json says
fuzz: deps
	@if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing: python3 python3-venv"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null || exit 1; \
	  else \
	    echo "missing: python3 with venv; install it with:  sudo apt-get install -y python3 python3-venv"; \
	    exit 1; \
	  fi; \
	fi
	@if [ ! -x "$(FUZZ_VENV)/bin/st" ]; then \
	  echo "installing schemathesis $(SCHEMATHESIS_VERSION) into $(FUZZ_VENV)"; \
	  python3 -m venv "$(FUZZ_VENV)" && \
	  "$(FUZZ_VENV)/bin/pip" install -q "schemathesis==$(SCHEMATHESIS_VERSION)" || exit 1; \
	fi
	$(CARGO_ENV) $(CARGO) build --release --bin cyrneld
	tests/fuzz/run.sh "$(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release/cyrneld" \
	  "$(FUZZ_VENV)/bin/st" $(FUZZ_EXAMPLES) $(FUZZ_SEED)

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

.PHONY: package package-checkers lint-packages test-packages

## package: the .deb and .rpm in packaging/dist/ (cargo-deb, installed at a pinned version when missing; rpmbuild from apt)
package: deps
	$(CARGO_ENV) CACHE_DIR=$(CACHE_DIR) CARGO=$(CARGO) packaging/build.sh packaging/dist

# The distributions' package checkers, from apt: lintian (Debian's) and
# rpmlint.
PACKAGE_CHECKERS = lintian rpmlint

package-checkers:
	@missing=""; \
	for tool in $(PACKAGE_CHECKERS); do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing package checkers:$$missing"; \
	    echo "install them with:  sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

## lint-packages: build both packages and run lintian on the .deb, rpmlint on the .rpm and its spec: no error or warning but the rpm's missing signature
lint-packages: package package-checkers
	packaging/lint.sh packaging/dist

## test-packages: lint-packages, then install both packages into Debian roots (debootstrap, cached under $(CACHE_DIR)) and an rpm root, and check them
test-packages: lint-packages
	CACHE_DIR=$(CACHE_DIR) packaging/test-install.sh packaging/dist

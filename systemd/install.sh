#!/usr/bin/env bash
# Install, upgrade or remove edge-agent as a systemd service (Debian, Ubuntu, Raspberry Pi OS, Jetson L4T).
#
#   sudo systemd/install.sh                 install or upgrade: /opt/edge-agent, /etc/edge-agent, units enabled
#   sudo systemd/install.sh --start         ... and (re)start the service now
#   sudo systemd/install.sh --console       also install the fleet console unit
#   sudo systemd/install.sh --uninstall     remove units and /opt/edge-agent; keep config and state
#   sudo systemd/install.sh --uninstall --purge   ... and remove /etc/edge-agent and /var/lib/edge-agent too
#   systemd/install.sh --root /tmp/stage    stage everything under a root folder (no users, no systemctl)
#
# Environment: PYTHON (default python3), PIP_ARGS (extra pip install arguments, e.g. an index or --no-deps),
# EXTRAS (pip extras, default "openvino"; "openvino,tflite", "console", or empty for none),
# SYSTEM_SITE_PACKAGES=1 (the venv sees the system's packages: JetPack's TensorRT and onnxruntime-gpu).
# Versions are pinned by deploy/constraints.txt. An onnxruntime-* build already in the venv (GPU
# devices) is kept: the CPU onnxruntime is not installed over it.
set -euo pipefail

ROOT=/
PREFIX=/opt/edge-agent
ACTION=install
START=0
CONSOLE=0
PURGE=0
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-openvino}
SYSTEM_SITE_PACKAGES=${SYSTEM_SITE_PACKAGES:-0}
SRC=$(cd "$(dirname "$0")/.." && pwd)

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift ;;
    --prefix) PREFIX=$2; shift ;;
    --uninstall) ACTION=uninstall ;;
    --purge) PURGE=1 ;;
    --start) START=1 ;;
    --console) CONSOLE=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT=${ROOT%/}
DEST=$ROOT$PREFIX
ETC=$ROOT/etc/edge-agent
UNITS=$ROOT/etc/systemd/system
LIVE=0
[ -z "$ROOT" ] && LIVE=1   # installing onto this system (not staging)
say() { printf '%s\n' "edge-agent install: $*"; }

if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "run as root (sudo), or stage with --root DIR" >&2
  exit 1
fi

units="edge-agent.service"
# An upgrade also updates (and restarts) a console installed earlier, or it would run old units
# against the replaced code.
if [ "$CONSOLE" = 1 ] || [ -f "$UNITS/edge-console.service" ]; then
  units="$units edge-console.service"
  case ",$EXTRAS," in *,console,*) ;; *) EXTRAS="${EXTRAS:+$EXTRAS,}console" ;; esac
fi

if [ "$ACTION" = uninstall ]; then
  if [ "$LIVE" = 1 ]; then
    for u in edge-agent.service edge-console.service; do
      systemctl disable --now "$u" 2>/dev/null || true
    done
  fi
  rm -f "$UNITS/edge-agent.service" "$UNITS/edge-console.service"
  [ "$LIVE" = 1 ] && systemctl daemon-reload
  rm -rf "$DEST"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$ROOT/var/lib/edge-agent" "$ROOT/var/lib/edge-console"
    if [ "$LIVE" = 1 ]; then
      userdel edge-agent 2>/dev/null || true
      userdel edge-console 2>/dev/null || true
    fi
    say "removed, config and state purged"
  else
    say "removed; kept $ETC and /var/lib/edge-agent (use --purge to delete them)"
  fi
  exit 0
fi

# 1. Service users, with the groups accelerators need (only those that exist on this system).
if [ "$LIVE" = 1 ]; then
  for user in edge-agent $([ "$CONSOLE" = 1 ] && echo edge-console); do
    if ! id "$user" >/dev/null 2>&1; then
      useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$user"
      say "created system user $user"
    fi
  done
  for group in video render plugdev; do
    getent group "$group" >/dev/null && usermod -aG "$group" edge-agent
  done
fi

# 2. The source tree (code + model repository) and a virtual environment.
mkdir -p "$DEST"
rm -rf "$DEST/src.new"
mkdir -p "$DEST/src.new"
# The project, not what a checkout collects around it (venvs, caches, build output, GPU bundles,
# databases and state from runs).
( cd "$SRC" && tar cf - --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' \
    --exclude=bench/out --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.hypothesis --exclude=./build --exclude=./dist --exclude=.whl --exclude=.gpu-broker \
    --exclude=.gpu-stash --exclude='*.db' --exclude='*.db-wal' --exclude='*.db-shm' --exclude=./state . ) \
  | ( cd "$DEST/src.new" && tar xf - )
# Models the operator added to the installed repository are theirs: an upgrade keeps them (a bundled
# model of the same name is replaced by the new release's).
if [ -d "$DEST/src/models" ]; then
  for model in "$DEST/src/models"/*/; do
    name=$(basename "$model")
    if [ -d "$model" ] && [ ! -e "$DEST/src.new/models/$name" ]; then
      cp -a "$model" "$DEST/src.new/models/$name"
      say "kept model $name (not bundled with this release)"
    fi
  done
fi
rm -rf "$DEST/src"
mv "$DEST/src.new" "$DEST/src"
if [ -x "$DEST/venv/bin/python" ] && [ "$SYSTEM_SITE_PACKAGES" = 1 ] \
  && ! grep -q "include-system-site-packages = true" "$DEST/venv/pyvenv.cfg"; then
  say "warning: $PREFIX/venv exists without system site packages; SYSTEM_SITE_PACKAGES=1 applies to a new venv (remove it first)"
fi
if [ ! -x "$DEST/venv/bin/python" ]; then
  # Jetson: JetPack's TensorRT bindings and an onnxruntime-gpu build live in the system Python.
  if [ "$SYSTEM_SITE_PACKAGES" = 1 ]; then
    "$PYTHON" -m venv --system-site-packages "$DEST/venv"
  else
    "$PYTHON" -m venv "$DEST/venv"
  fi
  say "created $PREFIX/venv"
fi
VPY="$DEST/venv/bin/python"
# Every device gets the versions this release was tested with (deploy/constraints.txt).
constraints=()
[ -f "$SRC/deploy/constraints.txt" ] && constraints=(-c "$SRC/deploy/constraints.txt")
# A GPU device brings its own ONNX Runtime build (onnxruntime-gpu, onnxruntime-openvino, ...):
# pip would install the CPU `onnxruntime` over it (same module, other files). Keep it: install
# edge-agent without dependencies, then every dependency but onnxruntime.
own_ort=$("$VPY" -c 'import importlib.metadata as m
names = {(d.metadata["Name"] or "").lower() for d in m.distributions()}
print(" ".join(sorted(n for n in names if n.startswith("onnxruntime-"))))')
target="$DEST/src"
[ -n "$EXTRAS" ] && target="$DEST/src[$EXTRAS]"
if [ -n "$own_ort" ]; then
  ort_imported=$("$VPY" -c "import onnxruntime" >/dev/null 2>&1 && echo yes || echo no)
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q ${PIP_ARGS:-} --no-deps "$DEST/src"
  deps_text=$("$VPY" - "$SRC/pyproject.toml" "$EXTRAS" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = list(project["dependencies"])
extras = project["optional-dependencies"]
for extra in filter(None, (e.strip() for e in sys.argv[2].split(","))):
    if extra not in extras:
        sys.exit(f"EXTRAS: unknown extra {extra!r} (known: {', '.join(sorted(extras))})")
    wanted += extras[extra]
for dep in wanted:
    if re.match(r"onnxruntime\b", dep) is None and not dep.startswith("edge-agent"):
        print(dep)
PY
)
  mapfile -t deps <<< "$deps_text"
  # numpy stays whatever that build was made against (no pin): a newer one can break its import.
  kept_constraints=()
  if [ ${#constraints[@]} -gt 0 ]; then
    grep -v '^numpy==' "$SRC/deploy/constraints.txt" > "$DEST/constraints-kept-ort.txt"
    kept_constraints=(-c "$DEST/constraints-kept-ort.txt")
  fi
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q ${PIP_ARGS:-} "${kept_constraints[@]}" "${deps[@]}"
  if [ "$ort_imported" = yes ] && ! "$VPY" -c "import onnxruntime" 2>/dev/null; then
    echo "edge-agent install: $own_ort no longer imports after installing the dependencies" >&2
    echo "  (check its numpy requirement: $VPY -c 'import onnxruntime')" >&2
    exit 1
  fi
  say "kept this device's own ONNX Runtime ($own_ort)"
else
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q ${PIP_ARGS:-} "${constraints[@]}" "$target"
fi
say "installed edge-agent into $PREFIX/venv"

# 3. Config (never overwritten on upgrade) and units.
mkdir -p "$ETC" "$UNITS"
if [ ! -f "$ETC/agent.toml" ]; then
  sed "s|# models_dir = \"/opt/edge-agent/src/models\"|models_dir = \"$PREFIX/src/models\"|" \
    "$SRC/systemd/agent.toml.example" > "$ETC/agent.toml"
  chmod 0640 "$ETC/agent.toml"
  say "wrote $ETC/agent.toml (edit broker settings there)"
else
  say "kept existing $ETC/agent.toml"
fi
if [ "$CONSOLE" = 1 ] && [ ! -f "$ETC/console.toml" ]; then
  cp "$SRC/systemd/console.toml.example" "$ETC/console.toml"
  chmod 0640 "$ETC/console.toml"
  say "wrote $ETC/console.toml (add users with: edge-console hash-password)"
fi
for u in $units; do
  sed "s|/opt/edge-agent|$PREFIX|g" "$SRC/systemd/$u" > "$UNITS/$u"
done
say "installed units: $units"

if [ "$LIVE" = 1 ]; then
  chown -R root:edge-agent "$ETC"
  # The console runs as its own user: its config (0640) must be readable by that user's group.
  if [ -f "$ETC/console.toml" ] && id edge-console >/dev/null 2>&1; then
    chgrp edge-console "$ETC/console.toml"
  fi
  systemctl daemon-reload
  for u in $units; do
    # A console installed earlier is updated, but enabled only when asked for (--console).
    if [ "$u" != edge-console.service ] || [ "$CONSOLE" = 1 ]; then
      systemctl enable "$u" >/dev/null
    fi
    if [ "$START" = 1 ] || systemctl is-active --quiet "$u"; then
      systemctl restart "$u"
      say "(re)started $u"
    fi
  done
  say "enabled; start with: systemctl start edge-agent; logs: journalctl -u edge-agent -f"
else
  say "staged under $ROOT (no users created, systemctl not called)"
fi

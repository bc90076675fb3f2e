#!/usr/bin/env bash
# Install gpuspool as a systemd service. Safe to run again: it only changes what differs.
#
#   deploy/install.sh [--root DIR] [--prefix DIR] [--no-venv] [--reinstall] [--pip-args "ARGS"]
#                     [--python PYTHON] [--config FILE] [--service-user] [--no-enable]
#                     [--no-systemd-tools]
#
# What it does (docs/deploy.md explains each part):
#   1. the service user `gpuspool` and the submitters' group `gpuspool-submit` (sysusers.d);
#   2. the spool, state and log folders with their owners and modes (tmpfiles.d);
#   3. a virtual environment at PREFIX/venv with gpuspool and its `extract` extra, byte-compiled
#      (pip runs only when the source, the pip arguments or the interpreter changed since the
#      last run);
#   4. /etc/gpuspool/gpuspool.toml from config/gpuspool.toml, never replacing an edited one
#      (a newer default is written beside it as gpuspool.toml.new);
#   5. the unit in /etc/systemd/system, enabled for boot (not started).
#
# --root DIR        install into DIR instead of / (an image, or a test); users and groups are
#                   added to DIR/etc/passwd and DIR/etc/group, and systemctl is not called.
# --prefix DIR      where the venv and docs go (default /opt/gpuspool); ExecStart follows it.
# --no-venv         do not create or update the venv (it is provided some other way).
# --reinstall       run pip even when the venv's install stamp says nothing changed.
# --pip-args ARGS   extra arguments for pip, split on spaces (e.g. "--no-index -f /wheels";
#                   offline, the wheelhouse needs hatchling too: docs/deploy.md).
# --python PYTHON   the interpreter that creates the venv (default python3, >= 3.11).
# --config FILE     the default config to install (default: config/gpuspool.toml).
# --service-user    run the daemon as `gpuspool` instead of root: every job then runs as
#                   gpuspool (single-user hosts; see docs/deploy.md).
# --no-enable       install the unit but do not enable it.
# --no-systemd-tools  use useradd/groupadd and mkdir/chown/chmod even where systemd-sysusers
#                   and systemd-tmpfiles exist (they give the same result).
set -euo pipefail

# Everything installed must be readable by the users whose jobs run from the venv.
umask 022

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=/
PREFIX=/opt/gpuspool
MAKE_VENV=1
REINSTALL=0
PIP_ARGS=""
PYTHON=python3
CONFIG_SRC="$SRC/config/gpuspool.toml"
SERVICE_USER=0
ENABLE=1
SYSTEMD_TOOLS=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "gpuspool install: $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --no-venv) MAKE_VENV=0; shift ;;
        --reinstall) REINSTALL=1; shift ;;
        --pip-args) PIP_ARGS="${2?--pip-args needs a value}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --config) CONFIG_SRC="${2:?--config needs a file}"; shift 2 ;;
        --service-user) SERVICE_USER=1; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --no-systemd-tools) SYSTEMD_TOOLS=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "run as root (it creates users and root-owned folders)"
[[ $PREFIX == /* ]] || die "--prefix must be an absolute path"
[[ -f $CONFIG_SRC ]] || die "no config to install at $CONFIG_SRC"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
# R is prepended to absolute target paths: empty for the live system.
if [[ $ROOT == / ]]; then R=""; else R="$ROOT"; fi

# install_file SRC DEST MODE: copy only when the content or mode differs.
install_file() {
    local src="$1" dest="$2" mode="$3"
    if [[ -f $dest ]] && cmp -s "$src" "$dest" && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
        return 0
    fi
    install -D -m "$mode" -o 0 -g 0 "$src" "$dest"
    say "wrote ${dest#"$R"}"
}

# install_stamp: one line naming what the venv step installs: a hash of the package's source
# (what goes into the wheel), the pip arguments and the venv's interpreter version.
install_stamp() {
    local tree part parts=()
    for part in pyproject.toml README.md LICENSE src; do
        [[ -e $SRC/$part ]] && parts+=("$part")
    done
    tree="$(cd "$SRC" && find "${parts[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
        -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum)"
    printf 'gpuspool[extract] source=%s pip-args=%s python=%s\n' "${tree%% *}" "$PIP_ARGS" \
        "$("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])')"
}

# --- 1. users and groups ---------------------------------------------------------------------
install_file "$SRC/deploy/gpuspool.sysusers.conf" "$R/usr/lib/sysusers.d/gpuspool.conf" 0644
mkdir -p "$R/etc"
if [[ $SYSTEMD_TOOLS -eq 1 ]] && command -v systemd-sysusers >/dev/null; then
    systemd-sysusers --root "$ROOT" "$R/usr/lib/sysusers.d/gpuspool.conf"
else
    for f in passwd group shadow gshadow; do
        [[ -e $R/etc/$f ]] || install -m "$([[ $f == *shadow ]] && echo 0000 || echo 0644)" /dev/null "$R/etc/$f"
    done
    rootopt=()
    [[ -z $R ]] || rootopt=(--root "$ROOT")
    grep -q '^gpuspool:' "$R/etc/group" || groupadd --system "${rootopt[@]}" gpuspool
    grep -q '^gpuspool-submit:' "$R/etc/group" || groupadd --system "${rootopt[@]}" gpuspool-submit
    grep -q '^gpuspool:' "$R/etc/passwd" ||
        useradd --system "${rootopt[@]}" --gid gpuspool --no-create-home --home-dir / \
            --shell /usr/sbin/nologin --comment "gpuspool job queue" gpuspool
fi

# --- 2. folders ------------------------------------------------------------------------------
tmpfiles_src="$SRC/deploy/gpuspool.tmpfiles.conf"
install_file "$tmpfiles_src" "$R/usr/lib/tmpfiles.d/gpuspool.conf" 0644
tmpfiles_conf="$R/usr/lib/tmpfiles.d/gpuspool.conf"
override="$R/etc/tmpfiles.d/gpuspool.conf"
if [[ $SERVICE_USER -eq 1 ]]; then
    # The same folders, owned by the service user (same name in /etc overrides /usr/lib).
    generated="$(mktemp)"
    trap 'rm -f "$generated"' EXIT
    echo "# Generated by install.sh --service-user: the daemon runs as gpuspool." >"$generated"
    grep -v '^#' "$tmpfiles_src" | awk 'NF { if ($4 == "root") $4 = "gpuspool";
        if ($5 == "root") $5 = "gpuspool"; print }' >>"$generated"
    install_file "$generated" "$override" 0644
    tmpfiles_conf="$override"
elif [[ -f $override ]] && grep -q '^# Generated by install.sh' "$override"; then
    rm -f "$override"
    say "removed ${override#"$R"} (back to a root daemon)"
fi

# lookup_id DB NAME: the numeric id of NAME in $R/etc/DB (root is 0 even in an empty root).
lookup_id() {
    local id
    id="$(awk -F: -v n="$2" '$1 == n { print $3 }' "$R/etc/$1")"
    if [[ -z $id && $2 == root ]]; then id=0; fi
    [[ -n $id ]] || die "no $2 in $R/etc/$1"
    echo "$id"
}

if [[ $SYSTEMD_TOOLS -eq 1 ]] && command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --root "$ROOT" --create "$tmpfiles_conf"
else
    # The 'd' lines of the tmpfiles file, applied by hand: create, then set owner and mode.
    while read -r type path mode user group _; do
        [[ $type == d ]] || continue
        mkdir -p "$R$path"
        chown "$(lookup_id passwd "$user"):$(lookup_id group "$group")" "$R$path"
        chmod "$mode" "$R$path"
    done < <(grep -v '^#' "$tmpfiles_conf")
fi

# --- 3. the virtual environment --------------------------------------------------------------
venv="$R$PREFIX/venv"
if [[ $MAKE_VENV -eq 1 ]]; then
    if [[ ! -x $venv/bin/python ]]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "$PYTHON is older than 3.11"
        "$PYTHON" -m venv "$venv"
        say "created the venv ${venv#"$R"}"
    fi
    # pip rebuilds and reinstalls gpuspool on every run (a local path is never "already
    # satisfied"), which takes minutes with the extract extra; a stamp of what was installed
    # skips it when nothing changed.
    stamp="$venv/.gpuspool-install-stamp"
    want="$(install_stamp)"
    if [[ $REINSTALL -eq 0 && -f $stamp && "$(cat "$stamp")" == "$want" ]] &&
        "$venv/bin/python" -I -c 'import gpuspool' 2>/dev/null; then
        say "venv ${venv#"$R"} is up to date (nothing changed since the last install)"
    else
        rm -f "$stamp"
        # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
        "$venv/bin/python" -m pip install --quiet $PIP_ARGS "$SRC[extract]"
        # Jobs run as their submitters, who cannot write __pycache__ here: a module without
        # bytecode would be compiled again by every job. pip compiles what it installs unless
        # told not to (--no-compile); compile whatever is still missing or stale.
        purelib="$("$venv/bin/python" -c \
            'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$venv/bin/python" -m compileall -qq -j 0 "$purelib" ||
            say "note: some files in ${purelib#"$R"} do not compile (pip skips them as well)"
        printf '%s\n' "$want" >"$stamp"
        say "installed gpuspool[extract] into ${venv#"$R"}"
    fi
    # Jobs run as their submitters with this interpreter: every folder on its real path must
    # be open to others (a venv made from a Python under /root would not be).
    real="$(readlink -f "$venv/bin/python")"
    d="$real"
    while [[ $d != / && -n $d ]]; do
        perms="$(stat -L -c %A "$d")"
        [[ ${perms:9:1} == [xt] ]] ||
            say "WARNING: $d is not executable/searchable by other users; jobs running as their submitters cannot start $real"
        d="$(dirname "$d")"
    done
fi
if [[ -f $SRC/docs/deploy.md ]]; then
    install_file "$SRC/docs/deploy.md" "$R$PREFIX/docs/deploy.md" 0644
fi

# --- 4. the config ---------------------------------------------------------------------------
config="$R/etc/gpuspool/gpuspool.toml"
if [[ ! -e $config ]]; then
    install_file "$CONFIG_SRC" "$config" 0644
elif ! cmp -s "$CONFIG_SRC" "$config"; then
    # Edited by the administrator: keep it; offer the current default beside it.
    if ! cmp -s "$CONFIG_SRC" "$config.new" 2>/dev/null; then
        install_file "$CONFIG_SRC" "$config.new" 0644
        say "kept the edited ${config#"$R"}; the new default is in ${config#"$R"}.new"
    fi
fi

# --- 5. the unit -----------------------------------------------------------------------------
unit_dir="$R/etc/systemd/system"
unit="$unit_dir/gpuspool.service"
rendered="$(mktemp)"
trap 'rm -f "$rendered" "${generated:-}"' EXIT
sed -e "s#/opt/gpuspool/#$PREFIX/#g" "$SRC/systemd/gpuspool.service" >"$rendered"
install_file "$rendered" "$unit" 0644
dropin="$unit_dir/gpuspool.service.d/service-user.conf"
if [[ $SERVICE_USER -eq 1 ]]; then
    printf '%s\n' \
        "# Generated by install.sh --service-user: the daemon and every job run as gpuspool." \
        "[Service]" \
        "# Not root: no user switch, so no capabilities at all." \
        "User=gpuspool" \
        "# The service user's own group." \
        "Group=gpuspool" \
        "# Empty: drop every capability." \
        "CapabilityBoundingSet=" >"$rendered"
    install_file "$rendered" "$dropin" 0644
elif [[ -f $dropin ]]; then
    rm -f "$dropin"
    rmdir --ignore-fail-on-non-empty "$(dirname "$dropin")"
    say "removed ${dropin#"$R"} (back to a root daemon)"
fi

if [[ $ENABLE -eq 1 ]]; then
    if [[ -z $R && -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        systemctl daemon-reload
        systemctl enable gpuspool.service
    else
        # What `systemctl enable` does for WantedBy=multi-user.target, without a running
        # systemd (an image, a container, a test root).
        wants="$unit_dir/multi-user.target.wants"
        if [[ "$(readlink "$wants/gpuspool.service" 2>/dev/null)" != /etc/systemd/system/gpuspool.service ]]; then
            mkdir -p "$wants"
            ln -sfn /etc/systemd/system/gpuspool.service "$wants/gpuspool.service"
            say "enabled gpuspool.service (multi-user.target.wants)"
        fi
    fi
fi

say "done. Add submitters with: usermod -aG gpuspool-submit NAME"
if [[ -z $R ]]; then
    say "check the host with: $PREFIX/venv/bin/gpuspool doctor; start with: systemctl start gpuspool"
fi

#!/usr/bin/env bash
# Installs the cyrnel packages the way operators do and checks the result.
# Run by `make test-packages` (after `make package`) and so by .ci/run:
#
#   packaging/test-install.sh [DIST]     (DIST: where the packages are;
#                                         default packaging/dist, built if empty)
#
# The .deb goes into clean Debian bookworm roots made with debootstrap and
# cached under $CACHE_DIR/debootstrap (each run works on a fresh copy):
#   - "container": minbase, no systemd at all. apt install, then files,
#     modes, owners, the user, the packaged config, --version, the daemon
#     started the way the unit starts it (ExecStart= as its User=/Group=,
#     with its AmbientCapabilities=, CapabilityBoundingSet=, no_new_privs
#     and UMask=, as systemd would) answering /health, isolating its runs
#     at level full (a uid of their own, the data dir masked, /tmp/cyrnel),
#     also when sandbox = "full" is required; an upgrade keeps data and a
#     modified config; remove keeps /var/lib/cyrnel and the config; a
#     reinstall over existing data shows the old records; purge removes the
#     data.
#   - "systemd": minbase plus systemd (installed, not running, as in an
#     image build): the user comes from sysusers.d, the data dir from
#     tmpfiles.d, the unit is enabled, and `systemd-analyze verify` passes.
#   - "deb-sd": minbase made to look as if systemd ran (/run/systemd/system
#     and a systemctl that logs what it is asked): install starts the
#     unit, an upgrade while it runs reloads it (the daemon hands over to
#     the new binary; never a restart, which would end every run), an
#     upgrade while it does not run starts it, remove stops it; and no
#     maintainer script names a restart.
# The .rpm: metadata (URL, Packager, Group, %changelog), file list, config
# flags, scriptlets and dependencies with `rpm -qp`, then `rpm --root`
# install (scriptlets run, chrooted), an upgrade and an erase in a copy of
# the minbase root; then the same with a simulated running systemd: install
# enables and starts, an upgrade reloads a running daemon and leaves a
# stopped one alone, erase stops and disables; no scriptlet names a
# restart. (lintian and rpmlint run before this script: see
# packaging/lint.sh.)
#
# The machine running this has no running systemd, so nothing is started
# by systemctl; the daemon is started by hand from the installed unit's
# ExecStart=, User=, Group=, AmbientCapabilities=, CapabilityBoundingSet=,
# NoNewPrivileges= and UMask= (see start_daemon), in a mount namespace of
# its own where the root is a mount point (as "/" is under systemd). It
# listens on 127.0.0.1:0 (CYRNEL_LISTEN, the only setting that differs
# from the unit) so that runs never collide on a port.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dist=${1:-$repo/packaging/dist}
cache=${CACHE_DIR:-$HOME/.cache/cyrnel}
roots=$cache/debootstrap
suite=bookworm
deadline=30 # seconds any wait may take

passed=0
log() { printf '\n==> %s\n' "$*"; }
ok() {
	passed=$((passed + 1))
	printf 'ok %d - %s\n' "$passed" "$*"
}
fail() {
	printf 'FAIL - %s\n' "$*" >&2
	printf '%s passed, 1 failed\n' "$passed"
	exit 1
}
# check DESCRIPTION COMMAND...: COMMAND must succeed.
check() {
	local what=$1
	shift
	if "$@"; then ok "$what"; else fail "$what (command: $*)"; fi
}
# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
	if [ "$2" = "$3" ]; then ok "$1"; else fail "$1: expected '$2', got '$3'"; fi
}

[ "$(id -u)" = 0 ] || {
	echo "test-install.sh needs root (debootstrap, chroot, mount)" >&2
	exit 1
}

need_apt() {
	local cmd=$1
	shift
	command -v "$cmd" >/dev/null 2>&1 && return
	log "installing $*"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need_apt debootstrap debootstrap
need_apt rpm rpm
need_apt curl curl
need_apt readelf binutils
need_apt unshare util-linux
need_apt capsh libcap2-bin

shopt -s nullglob
debs=("$dist"/cyrnel_*.deb)
rpms=("$dist"/cyrnel-*.rpm)
if [ ${#debs[@]} -eq 0 ] || [ ${#rpms[@]} -eq 0 ]; then
	log "no packages in $dist: building them"
	make -C "$repo" package
	debs=("$dist"/cyrnel_*.deb)
	rpms=("$dist"/cyrnel-*.rpm)
fi
[ ${#debs[@]} -eq 1 ] && [ ${#rpms[@]} -eq 1 ] || fail "expected one .deb and one .rpm in $dist"
deb=${debs[0]}
rpm_file=${rpms[0]}
version=$(dpkg-deb -f "$deb" Version) # e.g. 0.1.0-1
upstream=${version%-*}                # e.g. 0.1.0

work=$(mktemp -d /tmp/cyrnel-test-install.XXXXXX)
daemon_pid=

# Mount points below DIR, deepest first.
mounts_below() {
	awk -v dir="$1/" 'index($2 "/", dir) == 1 { print $2 }' /proc/self/mounts | sort -r
}

cleanup() {
	set +e
	if [ -n "$daemon_pid" ]; then kill -KILL "$daemon_pid" 2>/dev/null; fi
	# Whatever still runs inside one of our roots was started by this script.
	local p
	for p in /proc/[0-9]*; do
		case "$(readlink "$p/root" 2>/dev/null)" in
		"$work"/*) kill -KILL "${p#/proc/}" 2>/dev/null ;;
		esac
	done
	for p in $(mounts_below "$work"); do umount -l "$p"; done
	# Never recurse into a mounted /proc.
	if [ -n "$(mounts_below "$work")" ]; then
		echo "test-install.sh: $work still has mounts; not removing it" >&2
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

# --- Debian roots --------------------------------------------------------

# The Debian mirror apt on this machine uses (deb.debian.org if none found).
mirror() {
	local uri
	uri=$(
		{
			sed -n 's/^[[:space:]]*URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null
			sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
				/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
		} | tr ' ' '\n' | grep -E '/debian/?$' | head -n1
	) || true
	echo "${DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

# The cached minbase root (sets $base); made once (about a minute), reused
# afterwards. A root whose creation was interrupted has no stamp and is
# made again.
base_root() {
	local dir=$roots/$suite-minbase
	if [ ! -e "$dir/.cyrnel-complete" ]; then
		log "debootstrap $suite (minbase) into $dir from $(mirror)"
		rm -rf "$dir"
		mkdir -p "$roots"
		debootstrap --variant=minbase "$suite" "$dir" "$(mirror)" >"$roots/debootstrap.log" 2>&1 ||
			fail "debootstrap failed; see $roots/debootstrap.log"
		chroot "$dir" apt-get clean
		touch "$dir/.cyrnel-complete"
	fi
	base=$dir
}

# The cached minbase root plus the systemd package, installed but not
# running (sets $sd).
systemd_root() {
	local dir=$roots/$suite-systemd
	base_root
	if [ ! -e "$dir/.cyrnel-complete" ]; then
		log "adding systemd to a copy of the minbase root ($dir)"
		rm -rf "$dir"
		cp -a "$base" "$dir"
		rm -f "$dir/.cyrnel-complete"
		cp /etc/resolv.conf "$dir/etc/resolv.conf"
		mount -t proc proc "$dir/proc"
		if ! chroot "$dir" sh -c 'export DEBIAN_FRONTEND=noninteractive;
			apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd && apt-get clean' \
			>"$roots/systemd-root.log" 2>&1; then
			umount -l "$dir/proc"
			fail "installing systemd into the root failed; see $roots/systemd-root.log"
		fi
		umount -l "$dir/proc"
		touch "$dir/.cyrnel-complete"
	fi
	sd=$dir
}

# new_root NAME SOURCE: a fresh copy of SOURCE with /proc mounted, in
# $work/NAME (unmounted and removed on exit).
new_root() {
	local root=$work/$1
	cp -a "$2" "$root"
	rm -f "$root/.cyrnel-complete"
	cp /etc/resolv.conf "$root/etc/resolv.conf"
	mount -t proc proc "$root/proc"
	mkdir -p "$root/tmp/pkgs"
}

# in_root ROOT COMMAND...: runs COMMAND in ROOT with a clean environment.
in_root() {
	local root=$1
	shift
	chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
		DEBIAN_FRONTEND=noninteractive "$@"
}

apt_in() {
	local root=$1
	shift
	in_root "$root" apt-get -y -q "$@" >"$work/apt.log" 2>&1 || {
		cat "$work/apt.log" >&2
		fail "apt-get $* in $(basename "$root")"
	}
}

# rpm_in ROOT ARGS...: rpm --root ROOT ARGS, failing the test with its output.
rpm_in() {
	local root=$1
	shift
	rpm --root "$root" "$@" >"$work/rpm.log" 2>&1 || {
		cat "$work/rpm.log" >&2
		fail "rpm $* in $(basename "$root")"
	}
}

# --- the daemon, started like the unit starts it -------------------------

unit_value() { # ROOT KEY: the value of KEY= in the installed unit
	sed -n "s/^$2=//p" "$1/usr/lib/systemd/system/cyrneld.service" | tail -n1
}

# unit_caps ROOT KEY: the capabilities listed in the unit's KEY= as
# setpriv(1) names, one per line (CAP_SYS_ADMIN -> sys_admin).
unit_caps() {
	local c
	for c in $(unit_value "$1" "$2"); do
		c=${c,,}
		echo "${c#cap_}"
	done
}

# start_daemon ROOT [NAME=VALUE...]: runs the unit's ExecStart inside ROOT
# as systemd would: as its User=/Group= (with initgroups), with its UMask=,
# its AmbientCapabilities= (raised in the inheritable and ambient sets, so
# they survive the uid change and the execve), its CapabilityBoundingSet=
# and no_new_privs (NoNewPrivileges=yes); NAME=VALUE are added to the
# daemon's environment. Waits for it to listen; sets daemon_pid and port.
#
# The daemon starts in a mount namespace of its own (unshare), where ROOT
# is bound onto itself before the chroot: level full's runs make their
# "/" private and read-only (mount propagation, mount_setattr), which
# needs "/" to be a mount point, as it is under systemd and not in a plain
# chroot. That namespace also gets /proc, the host's /dev (as the unit,
# without PrivateDevices=, sees it) with a /dev/shm of its own, and a
# /tmp of its own (PrivateTmp=). None of these mounts is visible outside
# it, and they go with it: the namespace ends with its last process, the
# daemon or one of its runs, which cleanup kills.
start_daemon() {
	local root=$1 exec_start user group umask_value log_file ambient bounding
	shift
	exec_start=$(unit_value "$root" ExecStart)
	user=$(unit_value "$root" User)
	group=$(unit_value "$root" Group)
	umask_value=$(unit_value "$root" UMask)
	ambient=$(unit_caps "$root" AmbientCapabilities | sed 's/^/+/' | paste -sd,)
	bounding=$(unit_caps "$root" CapabilityBoundingSet | sed 's/^/+/' | paste -sd,)
	[ -n "$ambient" ] || fail "the unit has no AmbientCapabilities="
	[ "$(grep -c '^NoNewPrivileges=yes$' "$root/usr/lib/systemd/system/cyrneld.service")" = 1 ] ||
		fail "the unit does not say NoNewPrivileges=yes once"
	log_file=$work/daemon.log
	: >"$log_file"
	# shellcheck disable=SC2016 # $1 and $@ belong to the inner shell
	# shellcheck disable=SC2086 # ExecStart is split into words, as systemd does
	(
		umask "${umask_value:-0022}"
		exec unshare --mount --propagation private -- /bin/sh -ec '
			root=$1
			shift
			mount --bind "$root" "$root"
			mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
			mount --rbind /dev "$root/dev"
			mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
			mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
			exec chroot "$root" "$@"' sh "$root" \
			/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CYRNEL_LISTEN=127.0.0.1:0 "$@" \
			/usr/bin/setpriv --reuid="$user" --regid="$group" --init-groups \
			--inh-caps="-all,$ambient" --ambient-caps="-all,$ambient" \
			--bounding-set="-all${bounding:+,$bounding}" --no-new-privs -- $exec_start
	) >>"$log_file" 2>&1 &
	daemon_pid=$!
	local waited=0
	port=
	while [ -z "$port" ]; do
		if ! kill -0 "$daemon_pid" 2>/dev/null; then
			cat "$log_file" >&2
			fail "cyrneld exited during start-up"
		fi
		port=$(sed -n 's/.*cyrneld listening addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log_file" | tail -n1)
		if [ -z "$port" ]; then
			[ "$waited" -lt $((deadline * 10)) ] || {
				cat "$log_file" >&2
				fail "cyrneld did not start listening within ${deadline}s"
			}
			sleep 0.1
			waited=$((waited + 1))
		fi
	done
	ok "cyrneld started as in ExecStart ($exec_start) as $user:$group${1:+ with $*}, listening on port $port"
}

stop_daemon() {
	local waited=0 status=0
	kill -TERM "$daemon_pid"
	while kill -0 "$daemon_pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$daemon_pid/stat" 2>/dev/null)" != Z ]; do
		[ "$waited" -lt $((deadline * 10)) ] || fail "cyrneld did not stop within ${deadline}s of SIGTERM"
		sleep 0.1
		waited=$((waited + 1))
	done
	wait "$daemon_pid" || status=$?
	daemon_pid=
	check_eq "cyrneld exits 0 after SIGTERM" 0 "$status"
}

api() { # PATH: GET from the running daemon
	curl -fsS --max-time "$deadline" "http://127.0.0.1:$port$1"
}

# logged_level_full: the daemon's start-up log says level full (else the
# log's sandbox lines go to stderr).
logged_level_full() {
	grep -q 'sandbox: runs are isolated level="full"' "$work/daemon.log" || {
		grep -i 'sandbox' "$work/daemon.log" >&2
		return 1
	}
}

# caps_of PID SET: the capabilities in SET (Eff, Prm, Bnd, Amb, Inh) of
# PID, as setpriv(1) names, sorted, one per line.
caps_of() {
	local mask
	mask=$(awk -v k="Cap$2:" '$1 == k {print $2}' "/proc/$1/status")
	capsh --decode="$mask" | sed 's/^0x[0-9a-f]*=\{0,1\}//' | tr ',' '\n' | sed -n 's/^cap_//p' | sort
}

# exercise_daemon ROOT: health, the daemon's identity and capabilities,
# the level it isolates runs at, and a run as level full makes it.
exercise_daemon() {
	local root=$1 uid expected_uid out wanted set
	check_eq "GET /health" '{"status":"ok"}' "$(api /health)"
	uid=$(awk '/^Uid:/ {print $2}' "/proc/$daemon_pid/status")
	expected_uid=$(in_root "$root" id -u cyrnel)
	check_eq "the daemon runs as cyrnel" "$expected_uid" "$uid"
	wanted=$(unit_caps "$root" AmbientCapabilities | sort)
	for set in Eff Prm Amb; do
		check_eq "the daemon's Cap$set is the unit's AmbientCapabilities= ($(paste -sd' ' <<<"$wanted"))" \
			"$wanted" "$(caps_of "$daemon_pid" "$set")"
	done
	check_eq "the daemon's CapBnd is the unit's CapabilityBoundingSet=" \
		"$(unit_caps "$root" CapabilityBoundingSet | sort)" "$(caps_of "$daemon_pid" Bnd)"
	check_eq "the daemon has no_new_privs" 1 "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$daemon_pid/status")"
	check "the start-up log says runs are isolated at level full" logged_level_full
	# What the run reports, one line each: uid, gid, working directory,
	# umask, how many of its capability sets are empty (of 5), the file
	# system mounted on the data dir in its view, whether it can list the
	# data dir.
	out=$(in_root "$root" cyrnelctl --url "http://127.0.0.1:$port" run -c '
		id -u; id -g; pwd; umask
		grep -cE "^Cap(Inh|Prm|Eff|Bnd|Amb):[[:space:]]+0+$" /proc/self/status
		sed -n "s|^[^ ]* [^ ]* [^ ]* [^ ]* /var/lib/cyrnel [^ ]* .*- \([^ ]*\) .*|\1|p" /proc/self/mountinfo
		if ls /var/lib/cyrnel >/dev/null 2>&1; then echo readable; else echo unreadable; fi') ||
		fail "cyrnelctl run failed: $out"
	local n run_uid run_gid cwd run_umask empty_sets data_fs data_access rec
	n=$(api /processes | grep -o '"id":[0-9]*' | cut -d: -f2 | sort -n | tail -n1)
	{ read -r run_uid; read -r run_gid; read -r cwd; read -r run_umask; read -r empty_sets
	  read -r data_fs; read -r data_access; } <<<"$out"
	rec=$(api "/processes/$n")
	check_eq "run $n is recorded at level full" full "$(json_string sandbox "$rec")"
	check "run $n has a uid of its own ($run_uid): not cyrnel's, not root, in the run uid range (>= 1879048192)" \
		test "$run_uid" != "$expected_uid" -a "$run_uid" != 0 -a "$run_uid" -ge 1879048192
	check_eq "run $n has its uid as its gid" "$run_uid" "$run_gid"
	check_eq "run $n works in /tmp/cyrnel (its private tmpfs)" /tmp/cyrnel "$cwd"
	check_eq "run $n has the unit's umask (inherited)" "$(unit_value "$root" UMask)" "$run_umask"
	check_eq "run $n holds no capability (all 5 sets empty)" 5 "$empty_sets"
	check_eq "run $n sees /var/lib/cyrnel masked (a tmpfs over it)" tmpfs "$data_fs"
	check_eq "run $n cannot list /var/lib/cyrnel" unreadable "$data_access"
	check_eq "run $n is recorded idle/success" "idle success" "$(record_state "$n")"
	check_eq "the database belongs to cyrnel, 0700" "700 cyrnel:cyrnel" \
		"$(in_root "$root" stat -c '%a %U:%G' /var/lib/cyrnel/db)"
}

# check_reload ROOT: `systemctl reload` (the unit's ExecReload=, run as
# systemd runs it, with MAINPID set) applies a new api_key from the config
# file while a process keeps running.
check_reload() {
	local root=$1 config=$1/etc/cyrnel/cyrneld.toml id
	id=$(create '{"code":"sleep 300","options":{"timeout":null}}')
	echo 'api_key = "package-test-key"' >>"$config"
	in_root "$root" env MAINPID="$daemon_pid" /bin/sh -c 'kill -HUP $MAINPID'
	local waited=0 status=
	while [ "$status" != 401 ]; do
		[ "$waited" -lt $((deadline * 10)) ] || fail "the reloaded api_key did not take effect (last status $status)"
		status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/processes")
		sleep 0.1
		waited=$((waited + 1))
	done
	ok "ExecReload (SIGHUP) applied the new api_key: requests without it get 401"
	check_eq "... and with it 200, the running process still running" running "$(
		json_string state "$(curl -fsS -H 'Authorization: Bearer package-test-key' \
			"http://127.0.0.1:$port/processes/$id")"
	)"
	check "... and the daemon is still the same process" kill -0 "$daemon_pid"
	sed -i '/^api_key = "package-test-key"$/d' "$config"
	in_root "$root" env MAINPID="$daemon_pid" /bin/sh -c 'kill -HUP $MAINPID'
	waited=0
	until curl -fsS -o /dev/null "http://127.0.0.1:$port/processes"; do
		[ "$waited" -lt $((deadline * 10)) ] || fail "removing api_key on reload did not take effect"
		sleep 0.1
		waited=$((waited + 1))
	done
	curl -fsS -XPOST -o /dev/null "http://127.0.0.1:$port/processes/$id/signals/kill"
}

create() { # BODY: POST /processes, prints the new id
	curl -fsS -XPOST "http://127.0.0.1:$port/processes" -d "$1" | grep -o '[0-9]*'
}

wait_state() { # ID STATE: polls the record until it is in STATE
	local waited=0 state=
	while [ "$state" != "$2" ]; do
		[ "$waited" -lt $((deadline * 10)) ] || fail "process $1 did not become $2 (last: $state)"
		state=$(json_string state "$(api "/processes/$1")")
		sleep 0.1
		waited=$((waited + 1))
	done
}

no_process_in() { # ROOT: no process runs with ROOT as its root directory
	local p
	for p in /proc/[0-9]*; do
		if [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ]; then
			echo "still running in $1: $(tr '\0' ' ' <"$p/cmdline")" >&2
			return 1
		fi
	done
}

record_state() { # ID: "state exitState" of a record
	local rec
	rec=$(api "/processes/$1")
	printf '%s %s' "$(json_string state "$rec")" "$(json_string exitState "$rec")"
}

json_string() { # KEY JSON: the value of a string member (flat JSON only)
	printf '%s' "$2" | grep -o "\"$1\":\"[^\"]*\"" | head -n1 | cut -d'"' -f4
}

# check_files ROOT: modes and owners of everything the package installs.
check_files() {
	local root=$1 zsh_dir=$2 changelog=$3 f
	while read -r mode owner f; do
		check_eq "$f: $mode $owner" "$mode $owner" "$(in_root "$root" stat -c '%a %U:%G' "$f" 2>&1)"
	done <<EOF
755 root:root /usr/bin/cyrneld
755 root:root /usr/bin/cyrnelctl
644 root:root /usr/lib/systemd/system/cyrneld.service
640 root:cyrnel /etc/cyrnel/cyrneld.toml
644 root:root /usr/lib/sysusers.d/cyrnel.conf
644 root:root /usr/lib/tmpfiles.d/cyrnel.conf
700 cyrnel:cyrnel /var/lib/cyrnel
644 root:root /usr/share/man/man1/cyrnelctl.1.gz
644 root:root /usr/share/man/man1/cyrnelctl-run.1.gz
644 root:root /usr/share/man/man8/cyrneld.8.gz
644 root:root /usr/share/bash-completion/completions/cyrnelctl
644 root:root $zsh_dir/_cyrnelctl
644 root:root /usr/share/fish/vendor_completions.d/cyrnelctl.fish
644 root:root /usr/share/doc/cyrnel/README.md
644 root:root $changelog
EOF
	check "man page cyrnelctl(1) is a gzipped roff page" \
		sh -c "zcat '$root/usr/share/man/man1/cyrnelctl.1.gz' | grep -q '^\.TH cyrnelctl'"
	check "man page cyrneld(8) is a gzipped roff page in section 8" \
		sh -c "zcat '$root/usr/share/man/man8/cyrneld.8.gz' | grep -q '^\.TH cyrneld 8'"
	check_eq "cyrneld --man prints the installed cyrneld(8)" \
		"$(zcat "$root/usr/share/man/man8/cyrneld.8.gz" | md5sum)" "$(in_root "$root" cyrneld --man | md5sum)"
	check "bash completion parses" bash -n "$root/usr/share/bash-completion/completions/cyrnelctl"
	check "zsh completion is a #compdef file" grep -q '^#compdef cyrnelctl' "$root$zsh_dir/_cyrnelctl"
	check "fish completion completes cyrnelctl" grep -q 'complete -c cyrnelctl' \
		"$root/usr/share/fish/vendor_completions.d/cyrnelctl.fish"
	for f in cyrneld cyrnelctl; do
		check "/usr/bin/$f has no debug info or symbol table" \
			sh -c "! readelf -S '$root/usr/bin/$f' | grep -qE '\.debug_|\.symtab'"
	done
	check_eq "cyrneld --version" "cyrneld $upstream" "$(in_root "$root" cyrneld --version)"
	check_eq "cyrnelctl --version" "cyrnelctl $upstream" "$(in_root "$root" cyrnelctl --version)"
	check "the packaged config sets data_dir = /var/lib/cyrnel" \
		grep -qx 'data_dir = "/var/lib/cyrnel"' "$root/etc/cyrnel/cyrneld.toml"
	check "the unit starts cyrneld with the packaged config" \
		grep -qx 'ExecStart=/usr/bin/cyrneld --config /etc/cyrnel/cyrneld.toml' \
		"$root/usr/lib/systemd/system/cyrneld.service"
}

check_user() {
	local root=$1 entry
	entry=$(in_root "$root" getent passwd cyrnel) || fail "no cyrnel user"
	IFS=: read -r _ _ uid gid _ home shell <<<"$entry"
	check "cyrnel is a system user (uid $uid < 1000)" test "$uid" -lt 1000
	check_eq "cyrnel's home is the data dir" /var/lib/cyrnel "$home"
	check "cyrnel cannot log in (shell $shell)" sh -c "case '$shell' in */nologin) ;; *) false ;; esac"
	check_eq "cyrnel's group is cyrnel" cyrnel "$(in_root "$root" getent group "$gid" | cut -d: -f1)"
}

# --- maintainer scripts under a running systemd (simulated) ---------------

# fake_systemd ROOT: ROOT looks as if systemd ran (/run/systemd/system is
# there) and its systemctl, in /usr/sbin ahead of /usr/bin in the scripts'
# PATH, only logs its arguments to ROOT/systemctl.log; `is-active` answers
# as ROOT/unit-active says (yes or no), `is-enabled` says enabled.
# deb-systemd-invoke and deb-systemd-helper are the root's own.
fake_systemd() {
	mkdir -p "$1/run/systemd/system"
	cat >"$1/usr/sbin/systemctl" <<'EOF'
#!/bin/sh
echo "$*" >>/systemctl.log
for arg; do
	case $arg in
	is-active) [ "$(cat /unit-active 2>/dev/null)" = yes ]; exit ;;
	is-enabled) echo enabled; exit 0 ;;
	esac
done
exit 0
EOF
	chmod 0755 "$1/usr/sbin/systemctl"
}

# unit_running ROOT yes|no: whether systemctl says the unit is active from
# now on; clears the log.
unit_running() {
	echo "$2" >"$1/unit-active"
	: >"$1/systemctl.log"
}

# unit_actions ROOT: what the scripts asked systemctl to do since the log
# was cleared, as "verb unit", comma-separated; queries (is-active,
# is-enabled) and daemon-reload left out.
unit_actions() {
	awk '{ for (i = 1; i <= NF; i++) if ($i !~ /^-/) {
		if ($i !~ /^(is-active|is-enabled|daemon-reload)$/) print $i " " $(i + 1)
		break } }' "$1/systemctl.log" | paste -sd, -
}

# no_restart_in TEXT: none of the script lines (comments aside) restarts.
# (Not `! … | grep -q`: with pipefail, grep -q stopping at a match could
# kill the first grep with SIGPIPE and turn the match into a pass.)
no_restart_in() {
	# -w: `restart` also matches try-restart and (try-)reload-or-restart.
	[ -z "$(grep -vE '^[[:space:]]*#' <<<"$1" | grep -wE 'restart|condrestart')" ]
}

# --- .deb in a container-like root (no systemd) --------------------------

log "package sizes"
ls -l "$deb" "$rpm_file"
deb_size=$(stat -c %s "$deb")
rpm_size=$(stat -c %s "$rpm_file")

log "preparing Debian $suite roots"
systemd_root # and base_root

# A second .deb, the same but newer, to test the upgrade path.
upgrade_version="$version+upgradetest"
upgrade_deb=$work/cyrnel_${upgrade_version}_amd64.deb
(cd "$repo" && cargo deb --no-build --quiet --deb-version "$upgrade_version" --output "$upgrade_deb") >/dev/null ||
	fail "building the upgrade .deb"

log ".deb in a minbase root without systemd (a container)"
new_root deb "$base"
R=$work/deb
cp "$deb" "$upgrade_deb" "$R/tmp/pkgs/"
apt_in "$R" install --no-install-recommends "/tmp/pkgs/$(basename "$deb")"
ok "apt install ./$(basename "$deb") (no systemd)"
check_eq "dpkg status" "install ok installed $version" \
	"$(in_root "$R" dpkg-query -W -f '${Status} ${Version}' cyrnel)"
check_eq "conffiles" "/etc/cyrnel/cyrneld.toml" \
	"$(in_root "$R" dpkg-query -W -f '${Conffiles}' cyrnel | awk 'NF {print $1}')"
check "the copyright file is machine-readable (DEP-5) and says Apache-2.0" \
	sh -c "head -n1 '$R/usr/share/doc/cyrnel/copyright' | grep -q '^Format: .*copyright-format/1.0/' &&
		grep -qx 'License: Apache-2.0' '$R/usr/share/doc/cyrnel/copyright' &&
		grep -q '/usr/share/common-licenses/Apache-2.0' '$R/usr/share/doc/cyrnel/copyright'"
check_eq "changelog.Debian's newest entry is this version" "$version" \
	"$(zcat "$R/usr/share/doc/cyrnel/changelog.Debian.gz" | sed -n '1s/^cyrnel (\([^)]*\)).*/\1/p')"
check "the upstream changelog is changelog.gz (CHANGELOG.md)" \
	sh -c "zcat '$R/usr/share/doc/cyrnel/changelog.gz' | cmp -s - '$repo/CHANGELOG.md'"
check_user "$R"
check_files "$R" /usr/share/zsh/vendor-completions /usr/share/doc/cyrnel/changelog.gz
check "the unit is enabled (multi-user.target.wants), offline" \
	test -L "$R/etc/systemd/system/multi-user.target.wants/cyrneld.service"

start_daemon "$R"
exercise_daemon "$R"
check_reload "$R"
stop_daemon

log "upgrade to $upgrade_version with a modified config"
echo 'max_running = 1' >>"$R/etc/cyrnel/cyrneld.toml"
apt_in "$R" install --no-install-recommends "/tmp/pkgs/$(basename "$upgrade_deb")"
check_eq "upgraded" "install ok installed $upgrade_version" \
	"$(in_root "$R" dpkg-query -W -f '${Status} ${Version}' cyrnel)"
check "the modified config survived the upgrade" grep -qx 'max_running = 1' "$R/etc/cyrnel/cyrneld.toml"
check_eq "the config is still 640 root:cyrnel" "640 root:cyrnel" \
	"$(in_root "$R" stat -c '%a %U:%G' /etc/cyrnel/cyrneld.toml)"
start_daemon "$R"
check_eq "the record from before the upgrade is there" "idle success" "$(record_state 1)"
exercise_daemon "$R"
stop_daemon

log "sandbox = \"full\" required (CYRNEL_SANDBOX=full): the daemon does not refuse to start"
start_daemon "$R" CYRNEL_SANDBOX=full
check "the start-up log says runs are isolated at level full" logged_level_full
required=$(create '{"code":"id -u"}')
wait_state "$required" idle
check_eq "run $required is recorded at level full, idle/success" "full idle success" \
	"$(json_string sandbox "$(api "/processes/$required")") $(record_state "$required")"
stop_daemon

log "stop semantics: SIGTERM reaches the daemon alone (KillMode=process); it puts its runs down"
start_daemon "$R"
running=$(create '{"code":"sleep 300","options":{"timeout":null}}')
wait_state "$running" running
run_pid=$(api "/processes/$running" | grep -o '"pid":[0-9]*' | cut -d: -f2)
run_uid=$(awk '/^Uid:/ {print $2}' "/proc/$run_pid/status")
check "the running run ($run_pid), seen from the host, has a uid of its own ($run_uid), not cyrnel's or root's" \
	test "$run_uid" -ge 1879048192 -a "$run_uid" != "$(in_root "$R" id -u cyrnel)"
queued=$(create '{"code":"echo ran after the restart"}')
check_eq "with max_running = 1 a second run waits queued" queued "$(json_string state "$(api "/processes/$queued")")"
stop_daemon
check "the running process ($run_pid) is gone once the daemon has stopped" \
	sh -c "[ ! -e /proc/$run_pid ] || [ \"\$(awk '{print \$3}' /proc/$run_pid/stat)\" = Z ]"
check "nothing of the daemon or its runs is left (no orphan for systemd to kill)" no_process_in "$R"
start_daemon "$R"
check_eq "the run that was running is recorded canceled" "idle canceled" "$(record_state "$running")"
wait_state "$queued" idle
check_eq "the queued run ran after the restart" "idle success" "$(record_state "$queued")"
records=$(api /processes)
last_id=$(printf '%s' "$records" | grep -o '"id":[0-9]*' | cut -d: -f2 | sort -n | tail -n1)
stop_daemon

log "remove: data and config stay"
apt_in "$R" remove cyrnel
check_eq "dpkg status after remove" "deinstall ok config-files" \
	"$(in_root "$R" dpkg-query -W -f '${Status}' cyrnel)"
check "the binaries are gone" test ! -e "$R/usr/bin/cyrneld" -a ! -e "$R/usr/bin/cyrnelctl"
check "/var/lib/cyrnel and its database stay" test -d "$R/var/lib/cyrnel/db"
check "the config stays" grep -qx 'max_running = 1' "$R/etc/cyrnel/cyrneld.toml"

log "reinstall over the existing data"
apt_in "$R" install --no-install-recommends "/tmp/pkgs/$(basename "$upgrade_deb")"
start_daemon "$R"
check_eq "all $last_id records survived remove and reinstall, unchanged" "$records" "$(api /processes)"
check_eq "new ids continue above the old ones" $((last_id + 1)) \
	"$(curl -fsS -XPOST "http://127.0.0.1:$port/processes" -d '{"code":"true"}' | grep -o '[0-9]*')"
stop_daemon

log "purge: data and config go, the user stays"
apt_in "$R" purge cyrnel
check "dpkg no longer knows cyrnel" sh -c "! chroot '$R' dpkg-query -W cyrnel >/dev/null 2>&1"
check "/var/lib/cyrnel is gone" test ! -e "$R/var/lib/cyrnel"
check "/etc/cyrnel is gone" test ! -e "$R/etc/cyrnel"
check "the unit's enablement is gone" test ! -e "$R/etc/systemd/system/multi-user.target.wants/cyrneld.service"
check "the cyrnel user stays (Debian keeps system users)" sh -c "chroot '$R' getent passwd cyrnel >/dev/null"

log ".deb maintainer scripts under a running systemd (simulated): an upgrade reloads, never restarts"
for f in postinst prerm postrm; do
	dpkg-deb -I "$deb" "$f" >"$work/deb-$f" || fail "the .deb has no $f"
done
check "no maintainer script of the .deb restarts the daemon" \
	no_restart_in "$(cat "$work"/deb-postinst "$work"/deb-prerm "$work"/deb-postrm)"
new_root deb-sd "$base"
D=$work/deb-sd
cp "$deb" "$upgrade_deb" "$D/tmp/pkgs/"
fake_systemd "$D"
unit_running "$D" no
apt_in "$D" install --no-install-recommends "/tmp/pkgs/$(basename "$deb")"
check_eq "install: the unit is started" "start cyrneld.service" "$(unit_actions "$D")"
unit_running "$D" yes
apt_in "$D" install --no-install-recommends "/tmp/pkgs/$(basename "$upgrade_deb")"
check_eq "upgrade while the daemon runs: a reload, no restart, no stop" \
	"reload cyrneld.service" "$(unit_actions "$D")"
unit_running "$D" no
apt_in "$D" install --reinstall --no-install-recommends "/tmp/pkgs/$(basename "$upgrade_deb")"
check_eq "upgrade while it does not run: started (an enabled unit, as dh_installsystemd does), no reload" \
	"start cyrneld.service" "$(unit_actions "$D")"
unit_running "$D" yes
apt_in "$D" remove cyrnel
check_eq "remove: the unit is stopped" "stop cyrneld.service" "$(unit_actions "$D")"

# --- .deb where systemd is installed (not running) ----------------------

log ".deb in a root with systemd installed (not running)"
new_root deb-systemd "$sd"
S=$work/deb-systemd
cp "$deb" "$S/tmp/pkgs/"
apt_in "$S" install --no-install-recommends "/tmp/pkgs/$(basename "$deb")"
ok "apt install ./$(basename "$deb") (systemd installed)"
check_user "$S"
check_eq "the data dir (tmpfiles.d)" "700 cyrnel:cyrnel" "$(in_root "$S" stat -c '%a %U:%G' /var/lib/cyrnel)"
check_eq "the config" "640 root:cyrnel" "$(in_root "$S" stat -c '%a %U:%G' /etc/cyrnel/cyrneld.toml)"
check "the unit is enabled" test -L "$S/etc/systemd/system/multi-user.target.wants/cyrneld.service"
check "systemd-sysusers accepts cyrnel.conf" in_root "$S" systemd-sysusers --dry-run cyrnel.conf
# --man=no: the root has no man-db to look up Documentation=man:cyrnelctl(1)
# (the page itself is checked above).
if in_root "$S" systemd-analyze verify --man=no /usr/lib/systemd/system/cyrneld.service \
	>"$work/verify.log" 2>&1 &&
	! grep -q . "$work/verify.log"; then
	ok "systemd-analyze verify cyrneld.service: no findings"
else
	cat "$work/verify.log" >&2
	fail "systemd-analyze verify cyrneld.service"
fi
for key in Type=notify NotifyAccess=main User=cyrnel KillMode=process Delegate=yes Restart=on-failure \
	FileDescriptorStoreMax=5957 \
	"ExecReload=/bin/sh -c 'kill -HUP \$\$MAINPID'" LimitNOFILE=65536 NoNewPrivileges=yes; do
	check "the unit has $key" grep -qxF "$key" "$S/usr/lib/systemd/system/cyrneld.service"
done
full_caps=$(sed -n '/^pub const FULL_CAPS/,/^];/p' "$repo/src/proc/sandbox.rs" | grep -o '"CAP_[A-Z_]*"' |
	sed 's/.*"CAP_\([A-Z_]*\)".*/\1/' | tr 'A-Z' 'a-z' | sort)
[ -n "$full_caps" ] || fail "no FULL_CAPS found in src/proc/sandbox.rs"
check_eq "the unit's AmbientCapabilities= is FULL_CAPS (src/proc/sandbox.rs)" \
	"$full_caps" "$(unit_caps "$S" AmbientCapabilities | sort)"
check_eq "the unit's CapabilityBoundingSet= is the same list" \
	"$full_caps" "$(unit_caps "$S" CapabilityBoundingSet | sort)"
stop_timeout=$(unit_value "$S" TimeoutStopSec)
check "TimeoutStopSec ($stop_timeout) exceeds the default kill grace (5 s) plus the HTTP drain (5 s)" \
	test "${stop_timeout%s}" -gt 10
apt_in "$S" purge cyrnel
check "purge (systemd installed) removes the data and the enablement" \
	test ! -e "$S/var/lib/cyrnel" -a ! -e "$S/etc/systemd/system/multi-user.target.wants/cyrneld.service"

# --- .rpm ----------------------------------------------------------------

log ".rpm metadata"
check_eq "name version release arch license" "cyrnel $upstream 1 x86_64 Apache-2.0" \
	"$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{LICENSE}' "$rpm_file")"
check_eq "URL is Cargo.toml's homepage" "$(sed -n 's/^homepage = "\(.*\)"$/\1/p' "$repo/Cargo.toml")" \
	"$(rpm -qp --qf '%{URL}' "$rpm_file")"
check_eq "Packager is Cargo.toml's maintainer (the .deb's Maintainer)" "$(dpkg-deb -f "$deb" Maintainer)" \
	"$(rpm -qp --qf '%{PACKAGER}' "$rpm_file")"
check_eq "Group" "System Environment/Daemons" "$(rpm -qp --qf '%{GROUP}' "$rpm_file")"
check "the newest %changelog entry is $upstream-1" \
	sh -c "rpm -qp --changelog '$rpm_file' | head -n1 | grep -q ' - $upstream-1\$'"
check "the payload digests verify" sh -c "rpm -K --nosignature '$rpm_file' >/dev/null"
rpm -qplv "$rpm_file" >"$work/rpm-files"
while read -r mode user group f; do
	check "rpm file $f: $mode $user:$group" grep -qE "^$mode +1 +$user +$group +[0-9]+ .* $f\$" "$work/rpm-files"
done <<'EOF'
-rwxr-xr-x root root /usr/bin/cyrneld
-rwxr-xr-x root root /usr/bin/cyrnelctl
-rw-r--r-- root root /usr/lib/systemd/system/cyrneld.service
-rw-r----- root cyrnel /etc/cyrnel/cyrneld.toml
-rw-r--r-- root root /usr/lib/sysusers.d/cyrnel.conf
-rw-r--r-- root root /usr/lib/tmpfiles.d/cyrnel.conf
-rw-r--r-- root root /usr/share/man/man1/cyrnelctl.1.gz
-rw-r--r-- root root /usr/share/man/man8/cyrneld.8.gz
-rw-r--r-- root root /usr/share/bash-completion/completions/cyrnelctl
-rw-r--r-- root root /usr/share/zsh/site-functions/_cyrnelctl
-rw-r--r-- root root /usr/share/fish/vendor_completions.d/cyrnelctl.fish
-rw-r--r-- root root /usr/share/doc/cyrnel/README.md
-rw-r--r-- root root /usr/share/licenses/cyrnel/LICENSE
EOF
check "the package owns the directory /var/lib/cyrnel, 0700 cyrnel:cyrnel" \
	grep -qE '^drwx------ +[0-9]+ +cyrnel +cyrnel +[0-9]+ .* /var/lib/cyrnel$' "$work/rpm-files"
check "nothing in /var/lib/cyrnel is packaged (data is never the package's)" \
	sh -c "! grep -q '/var/lib/cyrnel/' '$work/rpm-files'"
check_eq "config files (noreplace)" "/etc/cyrnel/cyrneld.toml cn" \
	"$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm_file" | awk '$1 ~ /^\/etc\// && NF > 1')"
rpm -qp --scripts "$rpm_file" >"$work/rpm-scripts"
for s in preinstall postinstall preuninstall postuninstall; do
	check "rpm has a $s scriptlet" grep -q "^$s scriptlet" "$work/rpm-scripts"
done
rpm -qpR "$rpm_file" >"$work/rpm-requires"
for r in '/bin/sh' 'libc.so.6()(64bit)' 'libstdc++.so.6()(64bit)' 'shadow-utils'; do
	check "rpm requires $r" grep -qxF "$r" "$work/rpm-requires"
done

log ".rpm installed with rpm --root into a minbase root (scriptlets run there)"
new_root rpm "$base"
P=$work/rpm
cp "$rpm_file" "$P/tmp/pkgs/"
rpm_in "$P" --initdb
rpm_in "$P" -i --nodeps "$rpm_file"
ok "rpm --root … -i --nodeps $(basename "$rpm_file")"
check "rpm -V --nodeps: installed files match the package" rpm --root "$P" -V --nodeps cyrnel
check_user "$P"
check_files "$P" /usr/share/zsh/site-functions /usr/share/doc/cyrnel/CHANGELOG.md
start_daemon "$P"
exercise_daemon "$P"
stop_daemon

log ".rpm upgrade (release 2) and erase"
echo 'max_running = 8' >>"$P/etc/cyrnel/cyrneld.toml"
"$repo/packaging/rpm/build.sh" "$work" 2 >/dev/null || fail "building the release-2 .rpm"
rpm_in "$P" -U --nodeps "$work/cyrnel-$upstream-2.x86_64.rpm"
check_eq "upgraded" "cyrnel-$upstream-2.x86_64" "$(rpm --root "$P" -q cyrnel)"
check "the modified config survived the upgrade (noreplace)" grep -qx 'max_running = 8' "$P/etc/cyrnel/cyrneld.toml"
check "the data survived the upgrade" test -d "$P/var/lib/cyrnel/db"
rpm_in "$P" -e cyrnel
check "erase removes the binaries" test ! -e "$P/usr/bin/cyrneld"
check "erase keeps /var/lib/cyrnel" test -d "$P/var/lib/cyrnel/db"
check "erase keeps the modified config as .rpmsave" grep -qx 'max_running = 8' "$P/etc/cyrnel/cyrneld.toml.rpmsave"

log ".rpm scriptlets under a running systemd (simulated): an upgrade reloads, never restarts"
check "no scriptlet of the .rpm restarts the daemon" no_restart_in "$(<"$work/rpm-scripts")"
new_root rpm-sd "$base"
Q=$work/rpm-sd
fake_systemd "$Q"
rpm_in "$Q" --initdb
unit_running "$Q" no
rpm_in "$Q" -i --nodeps "$rpm_file"
check_eq "install: the unit is enabled and started" "enable cyrneld.service,start cyrneld.service" \
	"$(unit_actions "$Q")"
unit_running "$Q" yes
rpm_in "$Q" -U --nodeps "$work/cyrnel-$upstream-2.x86_64.rpm"
check_eq "upgrade while the daemon runs: a reload (the replaced package's %postun), no restart" \
	"reload cyrneld.service" "$(unit_actions "$Q")"
unit_running "$Q" no
# A reinstall of release 2, as for the .deb: the replaced instance's
# %postun runs with $1 = 1, as for an upgrade.
rpm_in "$Q" -U --nodeps --replacepkgs "$work/cyrnel-$upstream-2.x86_64.rpm"
check_eq "upgrade while it does not run: nothing" "" "$(unit_actions "$Q")"
unit_running "$Q" yes
rpm_in "$Q" -e cyrnel
check_eq "erase: the unit is stopped and disabled" "stop cyrneld.service,disable cyrneld.service" \
	"$(unit_actions "$Q")"

log "summary"
printf 'package sizes: %s %d bytes (%d KiB), %s %d bytes (%d KiB)\n' \
	"$(basename "$deb")" "$deb_size" $((deb_size / 1024)) \
	"$(basename "$rpm_file")" "$rpm_size" $((rpm_size / 1024))
printf 'test-packages: %d passed, 0 failed\n' "$passed"

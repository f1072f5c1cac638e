#!/usr/bin/env bash
# Builds the cyrnel .deb (cargo-deb) and .rpm (rpmbuild) into DIST
# (default: packaging/dist/). Run by `make package`, which passes the
# ccache settings for the RocksDB build.
#
# 1. Installs what is missing: dpkg-dev (dpkg-shlibdeps, for the .deb's
#    library dependencies), binutils and rpm (rpmbuild) with apt-get, and
#    cargo-deb with `cargo install --locked` at a pinned version.
# 2. Checks that the newest entry of each packaging changelog
#    (packaging/debian/changelog, the %changelog of packaging/rpm/cyrnel.spec)
#    is for Cargo.toml's version: a release needs an entry in both.
# 3. Builds the release binaries (the same profile `make test` uses, so a
#    tested tree does not rebuild RocksDB).
# 4. Stages what is generated at package-build time in packaging/build/:
#    the packaged config (platform/cyrneld.toml with data_dir set), the man
#    pages (`cyrneld --man`, `cyrnelctl man`) and shell completions produced
#    by the built binaries, and stripped copies of the binaries for the .rpm
#    (cargo-deb strips its own).
# 5. Runs cargo-deb (metadata in Cargo.toml) and packaging/rpm/build.sh
#    (rpmbuild on packaging/rpm/cyrnel.spec).
set -euo pipefail

CARGO_DEB_VERSION=3.8.0

repo=$(cd "$(dirname "$0")/.." && pwd)
dist=${1:-$repo/packaging/dist}
cache=${CACHE_DIR:-$HOME/.cache/cyrnel}
cargo=${CARGO:-cargo}
stage=$repo/packaging/build
target_dir=${CARGO_TARGET_DIR:-$repo/target}
cd "$repo"

log() { printf '==> %s\n' "$*"; }

# need_apt COMMAND PACKAGE...: installs PACKAGE when COMMAND is missing.
need_apt() {
	local cmd=$1
	shift
	command -v "$cmd" >/dev/null 2>&1 && return
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		log "installing $* (for $cmd)"
		DEBIAN_FRONTEND=noninteractive apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
	else
		echo "missing $cmd; install it with: sudo apt-get install -y $*" >&2
		exit 1
	fi
}

# need_cargo_tool CRATE VERSION: `cargo install --locked` unless that exact
# version is installed. Built in its own target dir, so the project's
# (possibly shared, cached) target dir holds only the project.
need_cargo_tool() {
	local crate=$1 version=$2
	if [ "$("$crate" --version 2>/dev/null)" = "$crate $version" ]; then
		return
	fi
	log "installing $crate $version (cargo install --locked)"
	CARGO_TARGET_DIR="$cache/tools-target" \
		"$cargo" install --locked --quiet "$crate" --version "$version"
}

need_apt dpkg-shlibdeps dpkg-dev
need_apt strip binutils
need_apt gzip gzip
need_apt rpmbuild rpm
need_cargo_tool cargo-deb "$CARGO_DEB_VERSION"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
deb_changelog=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
[ "$deb_changelog" = "$version-1" ] || {
	echo "packaging/debian/changelog: the newest entry is $deb_changelog, not $version-1 (Cargo.toml)" >&2
	exit 1
}
rpm_changelog=$(sed -n '/^%changelog/,$ s/^\* .* - \([^ ]*\)$/\1/p' packaging/rpm/cyrnel.spec | head -n1)
[ "$rpm_changelog" = "$version-1" ] || {
	echo "packaging/rpm/cyrnel.spec: the newest %changelog entry is ${rpm_changelog:-missing}, not $version-1 (Cargo.toml)" >&2
	exit 1
}

log "building release binaries"
"$cargo" build --release --bins

bin=$target_dir/release
log "staging generated files in ${stage#"$repo"/}"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/man" "$stage/completions" "$dist"

# The packaged config: the documented defaults, with data_dir set to the
# directory that the unit (StateDirectory=) and tmpfiles.d create. Set in
# the file rather than as a --data-dir flag in the unit, because a flag
# would silently win over whatever an operator writes here.
{
	cat <<'EOF'
# /etc/cyrnel/cyrneld.toml: read by cyrneld.service (cyrneld --config
# /etc/cyrnel/cyrneld.toml). `systemctl reload cyrneld` applies api_key,
# the rate_limit_* keys and log_level without touching running processes;
# every other key takes effect at `systemctl restart cyrneld`.
#
EOF
	awk '
		$0 == "#data_dir = \"cyrnel-data\"" {
			print "# Set by the package: the directory that cyrneld.service (StateDirectory=)"
			print "# and tmpfiles.d create, 0700 cyrnel. The built-in default is \"cyrnel-data\"."
			print "data_dir = \"/var/lib/cyrnel\""
			found = 1
			next
		}
		{ print }
		END { if (!found) { print "platform/cyrneld.toml: no #data_dir line" > "/dev/stderr"; exit 1 } }
	' platform/cyrneld.toml
} >"$stage/cyrneld.toml"

"$bin/cyrneld" --man >"$stage/man/cyrneld.8"
"$bin/cyrnelctl" man --out-dir "$stage/man"
gzip -9n "$stage"/man/*.[18]
"$bin/cyrnelctl" completions bash >"$stage/completions/cyrnelctl.bash"
"$bin/cyrnelctl" completions zsh >"$stage/completions/_cyrnelctl"
"$bin/cyrnelctl" completions fish >"$stage/completions/cyrnelctl.fish"

# For the .rpm: cargo-generate-rpm packages files as they are, so strip
# them here the way cargo-deb strips the .deb's (debug info and unneeded
# symbols; panics still report their source location).
for b in cyrneld cyrnelctl; do
	strip --strip-unneeded --remove-section=.comment --remove-section=.note \
		-o "$stage/bin/$b" "$bin/$b"
done

log "building the .deb (cargo-deb $CARGO_DEB_VERSION)"
rm -f "$dist"/cyrnel_*.deb "$dist"/cyrnel-*.rpm
"$cargo" deb --no-build --quiet --output "$dist/"
log "building the .rpm (rpmbuild, packaging/rpm/cyrnel.spec)"
packaging/rpm/build.sh "$dist"

log "packages:"
ls -l "$dist"/cyrnel_*.deb "$dist"/cyrnel-*.rpm

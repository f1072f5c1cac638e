#!/usr/bin/env bash
# Runs the distributions' package checkers on the built packages. Run by
# `make lint-packages` and `make test-packages` (the Makefile installs
# lintian and rpmlint with apt-get when they are missing):
#
#   packaging/lint.sh [DIST]     (DIST: where the packages are; default
#                                 packaging/dist)
#
# - lintian, Debian's checker, on the .deb: no error and no warning
#   (informational tags are shown, not counted). Its overrides, each
#   justified, are in packaging/debian/lintian-overrides.
# - rpmlint on the .rpm and on packaging/rpm/cyrnel.spec, with the settings
#   and justified filters of packaging/rpm/rpmlint.toml: no error and no
#   warning except "E: no-signature" (the packages are not signed).
# - every program in /usr/bin of either package has its man page in
#   section 1 or 8 (rpmlint 2.4 cannot tell, see rpmlint.toml).
#
# Prints every finding, then "lint-packages: N passed, M failed"; exits 1
# when anything failed.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dist=${1:-$repo/packaging/dist}
shopt -s nullglob
debs=("$dist"/cyrnel_*.deb)
rpms=("$dist"/cyrnel-*.rpm)
if [ ${#debs[@]} -ne 1 ] || [ ${#rpms[@]} -ne 1 ]; then
	echo "packaging/lint.sh: expected one .deb and one .rpm in $dist (make package)" >&2
	exit 1
fi
deb=${debs[0]}
rpm_file=${rpms[0]}
for tool in lintian rpmlint; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "packaging/lint.sh: $tool is missing; install it with: sudo apt-get install -y $tool" >&2
		exit 1
	}
done

passed=0
failed=0
result() { # OK? DESCRIPTION
	if [ "$1" = 0 ]; then
		passed=$((passed + 1))
		printf 'ok - %s\n' "$2"
	else
		failed=$((failed + 1))
		printf 'FAIL - %s\n' "$2"
	fi
}
out=$(mktemp -d /tmp/cyrnel-lint.XXXXXX)
trap 'rm -rf "$out"' EXIT

printf '\n==> lintian %s\n' "$(basename "$deb")"
lintian --version
# --fail-on: exit status 2 on any error or warning; info tags are shown.
lintian --display-info --fail-on error,warning "$deb" 2>&1 | tee "$out/lintian"
status=${PIPESTATUS[0]}
errors=$(grep -c '^E: ' "$out/lintian")
warnings=$(grep -c '^W: ' "$out/lintian")
[ "$status" = 0 ] && [ "$errors" = 0 ] && [ "$warnings" = 0 ]
result $? "lintian: $errors errors, $warnings warnings (exit status $status)"

printf '\n==> rpmlint %s packaging/rpm/cyrnel.spec\n' "$(basename "$rpm_file")"
# The spec as rpmbuild reads it: packaging/rpm/build.sh defines its version.
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
{
	echo "%global cyrnel_version $version"
	cat "$repo/packaging/rpm/cyrnel.spec"
} >"$out/cyrnel.spec"
rpmlint -c "$repo/packaging/rpm/rpmlint.toml" "$rpm_file" "$out/cyrnel.spec" 2>&1 |
	tee "$out/rpmlint"
# rpmlint's exit status only reflects errors; count both, as lines.
findings=$(grep -E ': [EW]: ' "$out/rpmlint" | grep -vE '^cyrnel\.[a-z0-9_]+: E: no-signature$')
errors=$(grep -c ': E: ' <<<"$findings")
warnings=$(grep -c ': W: ' <<<"$findings")
[ "$errors" = 0 ] && [ "$warnings" = 0 ] && grep -q 'packages and 1 specfiles checked' "$out/rpmlint"
result $? "rpmlint: $errors errors, $warnings warnings besides the missing signature"

printf '\n==> man pages\n'
deb_files=$(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./|/|')
rpm_files=$(rpm -qpl "$rpm_file")
for pkg in deb rpm; do
	if [ "$pkg" = deb ]; then files=$deb_files; else files=$rpm_files; fi
	for prog in $(grep -E '^/usr/s?bin/[^/]+$' <<<"$files"); do
		name=${prog##*/}
		grep -qxE "/usr/share/man/man[18]/$name\.[18]\.gz" <<<"$files"
		result $? ".$pkg: $prog has a man page ($(grep -oE "man[18]/$name\.[18]\.gz" <<<"$files" || echo none))"
	done
done

printf 'lint-packages: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" = 0 ]

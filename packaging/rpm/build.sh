#!/usr/bin/env bash
# Builds the cyrnel .rpm with rpmbuild from packaging/rpm/cyrnel.spec and
# the files that packaging/build.sh staged in packaging/build/:
#
#   packaging/rpm/build.sh OUTDIR [RELEASE]
#
# writes OUTDIR/cyrnel-<version>-<release>.x86_64.rpm (RELEASE: 1 unless
# given; test-install.sh builds release 2 to test an upgrade). rpmbuild
# works in a temporary directory; nothing is written into the checkout.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
release=${2:-1}
stage=$repo/packaging/build
[ -x "$stage/bin/cyrneld" ] || {
	echo "packaging/rpm/build.sh: nothing staged in $stage; run packaging/build.sh (make package)" >&2
	exit 1
}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
homepage=$(sed -n 's/^homepage = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
top=$(mktemp -d /tmp/cyrnel-rpmbuild.XXXXXX)
trap 'rm -rf "$top"' EXIT

# --nodeps: the build host need not be an RPM system (it is Debian here);
# nothing is compiled, so there are no build dependencies to check.
# __brp_compress: Debian's rpm ships brp-compress (which recompresses man
# pages) with a #!/bin/sh line, but it needs bash (`read -d`); run it with
# bash, as it runs on RPM distributions, where /bin/sh is bash.
rpmbuild -bb --nodeps --quiet \
	--define "_topdir $top" \
	--define '__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}' \
	--define "_rpmdir $out" \
	--define "_build_name_fmt %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm" \
	--define "cyrnel_version $version" \
	--define "cyrnel_release $release" \
	--define "cyrnel_url $homepage" \
	--define "packager $maintainer" \
	--define "stage $stage" \
	--define "repo $repo" \
	"$repo/packaging/rpm/cyrnel.spec"

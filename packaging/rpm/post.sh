# %post of the cyrnel .rpm ($1: 1 = install, 2 = upgrade): apply
# tmpfiles.d, then on a first install enable the unit, and start it when
# systemd runs. (An upgrade reloads it in %postun, once the old files are
# gone.) Never fails the transaction: containers and chroots have no
# running systemd. The data dir needs no fallback where systemd-tmpfiles
# is missing: it is a directory of the package (0700 cyrnel:cyrnel).
if command -v systemd-tmpfiles >/dev/null 2>&1; then
	systemd-tmpfiles --create cyrnel.conf || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
	# Works offline too: it only creates the WantedBy= symlink.
	systemctl --no-reload enable cyrneld.service >/dev/null 2>&1 || :
	if [ -d /run/systemd/system ]; then
		systemctl start cyrneld.service || :
	fi
fi
exit 0

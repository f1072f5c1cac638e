# %postun of the cyrnel .rpm ($1: 0 = removal, 1 = upgrade): reload systemd,
# and after an upgrade reload the daemon if it runs, never restart it:
# SIGHUP makes it re-read its config and hand over to the new binary
# (execve, same pid), so an upgrade ends no run, where a restart would
# cancel every running process. A stopped unit stays stopped (as with
# Fedora's try-restart). RPM runs the %postun of the package being
# replaced, once the new files are in place: this is what an upgrade *from*
# this package does.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ] && systemctl --quiet is-active cyrneld.service; then
		systemctl reload cyrneld.service || :
	fi
fi
exit 0

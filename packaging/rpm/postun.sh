# %postun of the cyrnel .rpm ($1: 0 = removal, 1 = upgrade): reload systemd,
# and after an upgrade restart the daemon on the new binary (it terminates
# its running processes itself, see cyrneld.service; queued ones survive).
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart cyrneld.service || :
	fi
fi
exit 0

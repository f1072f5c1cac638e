# %preun of the cyrnel .rpm ($1: 0 = removal, 1 = upgrade): on removal stop
# and disable the unit. The data dir is not the package's and stays; a
# modified config is kept as /etc/cyrnel/cyrneld.toml.rpmsave.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
	if [ -d /run/systemd/system ]; then
		systemctl stop cyrneld.service || :
	fi
	systemctl --no-reload disable cyrneld.service >/dev/null 2>&1 || :
fi
exit 0

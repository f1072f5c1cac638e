# %pre of the cyrnel .rpm ($1: 1 = install, 2 = upgrade): the cyrnel
# system user and group, before any file is unpacked (the config file is
# group-owned by cyrnel). Same fields as /usr/lib/sysusers.d/cyrnel.conf,
# which is not unpacked yet at this point; idempotent.
getent group cyrnel >/dev/null || groupadd -r cyrnel
getent passwd cyrnel >/dev/null ||
	useradd -r -g cyrnel -d /var/lib/cyrnel -M -s /sbin/nologin \
		-c "Cyrnel process supervisor" cyrnel
exit 0

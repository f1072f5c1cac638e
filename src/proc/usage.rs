//! The daemon's own resource use, as Prometheus' standard process metrics
//! report it (the same sources as the Go client's process collector):
//! `/proc/self/stat` for CPU time, memory, threads and start time,
//! `/proc/stat` for the boot time, `/proc/self/fd` for open descriptors and
//! `RLIMIT_NOFILE` for their limit. Knows nothing of the metrics library.

use std::fs;
use std::io;
use std::sync::OnceLock;

/// One reading of the daemon's own resource use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OwnUsage {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE`.
    pub max_fds: u64,
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq, Eq)]
struct StatFields {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn parse_stat(s: &str) -> Option<StatFields> {
    // The command name (field 2) may contain spaces and parentheses; every
    // later field starts after the last ')', at field 3.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(StatFields {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

fn parse_btime(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn sysconf(name: libc::c_int) -> io::Result<u64> {
    // SAFETY: sysconf takes an integer and returns one.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(io::Error::last_os_error)
}

/// Clock ticks per second, page size and boot time: fixed while we run.
fn constants() -> io::Result<(u64, u64, u64)> {
    static CONSTANTS: OnceLock<(u64, u64, u64)> = OnceLock::new();
    if let Some(c) = CONSTANTS.get() {
        return Ok(*c);
    }
    let tick = sysconf(libc::_SC_CLK_TCK)?;
    let page = sysconf(libc::_SC_PAGESIZE)?;
    let btime = parse_btime(&fs::read_to_string("/proc/stat")?)
        .ok_or_else(|| io::Error::other("no btime line in /proc/stat"))?;
    Ok(*CONSTANTS.get_or_init(|| (tick, page, btime)))
}

/// Reads the daemon's resource use now.
pub fn own_usage() -> io::Result<OwnUsage> {
    let (tick, page, btime) = constants()?;
    let stat = parse_stat(&fs::read_to_string("/proc/self/stat")?)
        .ok_or_else(|| io::Error::other("unexpected /proc/self/stat"))?;
    // The directory's own descriptor is counted too, as the Go client does.
    let open_fds = fs::read_dir("/proc/self/fd")?.count() as u64;
    let (soft_nofile, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_err(io::Error::from)?;
    let tick = tick as f64;
    Ok(OwnUsage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / tick,
        resident_bytes: stat.rss_pages.saturating_mul(page),
        virtual_bytes: stat.vsize,
        threads: stat.threads,
        start_time_seconds: btime as f64 + stat.start_ticks as f64 / tick,
        open_fds,
        max_fds: soft_nofile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a ')' of its own.
        let line = "4242 (cyr ne) d) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 75 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(StatFields {
                utime: 250,
                stime: 75,
                threads: 7,
                start_ticks: 123456,
                vsize: 987654321,
                rss_pages: 2048,
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1767225600\nprocesses 9\n"),
            Some(1_767_225_600)
        );
    }

    #[test]
    fn own_usage_is_plausible() {
        let u = own_usage().unwrap();
        assert!(u.resident_bytes > 0 && u.virtual_bytes >= u.resident_bytes);
        assert!(u.threads >= 1);
        assert!(u.open_fds >= 3 && u.open_fds <= u.max_fds, "{u:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before now (with the boot time's one-second resolution).
        assert!(u.start_time_seconds <= now + 1.0 && u.start_time_seconds > 0.0);
    }
}

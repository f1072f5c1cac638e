//! Rules the build enforces (as rust-analyzer's `tidy` does): the "must
//! not know" column of ARCHITECTURE.md's code map, turned into checks over
//! the source text. A rule that breaks fails `make test` with the file and
//! line. Comments are skipped, so prose may name anything.

use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to the crate.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            (rel, fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Whether `line` (code, not a comment) names `needle` as a path or call:
/// preceded by something that cannot be part of an identifier.
fn names(line: &str, needle: &str) -> bool {
    let code = line.trim_start();
    if code.starts_with("//") {
        return false;
    }
    let code = code.split(" // ").next().unwrap_or(code);
    code.match_indices(needle).any(|(at, _)| {
        code[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// Fails with every line outside `allowed` (path prefixes) that names any
/// of `needles`.
#[track_caller]
fn only_in(rule: &str, needles: &[&str], allowed: &[&str]) {
    let mut broken = Vec::new();
    for (file, text) in sources() {
        if allowed.iter().any(|a| file.starts_with(a)) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| names(line, needle)) {
                broken.push(format!("{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(broken.is_empty(), "{rule}:\n{}", broken.join("\n"));
}

#[test]
fn only_store_knows_rocksdb() {
    only_in(
        "RocksDB outside src/store",
        &["rocksdb::", "use rocksdb"],
        &["src/store/"],
    );
}

#[test]
fn only_api_and_the_client_know_http() {
    only_in(
        "hyper outside src/api and src/client.rs",
        &["hyper::", "hyper_util::", "use hyper"],
        &["src/api/", "src/client.rs"],
    );
}

#[test]
fn only_proc_talks_to_the_kernel_about_processes() {
    only_in(
        "nix or raw process calls outside src/proc",
        &[
            "nix::",
            "libc::kill",
            "libc::fork",
            "libc::clone",
            "libc::setsid",
            "libc::setpgid",
            "libc::unshare",
            "libc::mount",
            "libc::prctl",
            "SYS_pidfd",
            "SYS_landlock",
            "SYS_clone",
        ],
        &["src/proc/"],
    );
}

/// The reaping rules (ARCHITECTURE.md, "Kill and recovery"): a leader is
/// reaped once, through its pidfd; the only `P_ALL` wait is the orphan
/// reaper's; nothing uses tokio's or std's child handling, which reap on
/// their own.
#[test]
fn waits_happen_only_where_the_reaping_rules_say() {
    only_in(
        "a wait outside proc/mod.rs and proc/spawn.rs",
        &["waitid", "waitpid", "wait4", "libc::wait("],
        &["src/proc/mod.rs", "src/proc/spawn.rs"],
    );
    // The one exception: the handover's preflight runs the target binary
    // and waits for that child by its pid (std's wait), which can never
    // reap a leader.
    only_in(
        "a child-process API that reaps by itself",
        &["tokio::process", "process::Command", "Command::new"],
        &["src/proc/reexec.rs"],
    );
    let proc_mod =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/proc/mod.rs")).unwrap();
    let p_all: Vec<&str> = proc_mod
        .lines()
        .filter(|l| names(l, "libc::P_ALL"))
        .collect();
    assert_eq!(
        p_all.len(),
        1,
        "exactly one P_ALL wait (the orphan reaper): {p_all:?}"
    );
}

/// ARCHITECTURE.md names the mechanisms the code uses, and not the ones it
/// replaced.
#[test]
fn architecture_names_the_mechanisms_in_use() {
    let arch = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md")).unwrap();
    for used in [
        "CLONE_VFORK",
        "cgroup.events",
        "EPOLLPRI",
        "fsmount",
        "Landlock",
        "seccomp",
    ] {
        assert!(
            arch.contains(used),
            "ARCHITECTURE.md does not mention {used}"
        );
    }
    for gone in [
        "std::process::Command` (posix_spawn",
        "Staged code and the output file live in `<data_dir>/run",
    ] {
        assert!(!arch.contains(gone), "ARCHITECTURE.md still says {gone:?}");
    }
}

#[test]
fn the_rules_catch_what_they_should() {
    assert!(names("use rocksdb::DB;", "rocksdb::"));
    assert!(names("let x = nix::unistd::getpid();", "nix::"));
    assert!(!names("use tokio::net::unix::pipe;", "nix::"));
    assert!(!names("// nix:: in a comment", "nix::"));
    assert!(!names("let a = 1; // nix:: after code", "nix::"));
}

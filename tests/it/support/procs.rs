//! The kernel's view of processes, from /proc.

use std::fs;

use super::*;

/// State letter and process group of `pid` from /proc/N/stat. The command
/// name may contain spaces and parentheses, so fields are read after the
/// last ')': state, ppid, pgrp, ...
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// A process exists and is not a zombie (nor dead-being-reaped).
pub fn is_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Zombies whose parent is `pid`.
pub fn zombies_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if state == "Z" && ppid == pid {
            out.push(p);
        }
    }
    out
}

/// Waits until no zombie is left under `pid` (the daemon reaps orphans
/// reparented to it as they exit, on its main thread).
#[track_caller]
pub fn assert_no_zombies_under(pid: u32) {
    poll(
        &format!("no zombies under the daemon ({pid})"),
        || match zombies_of(pid) {
            z if z.is_empty() => Ok(()),
            z => Err(format!("zombies {z:?}")),
        },
    );
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return members;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, pgrp)) = proc_stat(pid) {
            if pgrp == pgid && state != 'Z' && state != 'X' {
                members.push(pid);
            }
        }
    }
    members.sort_unstable();
    members
}

/// Describes pids for failure messages: "pid (comm)".
pub fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| {
            let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            format!("{p} ({})", comm.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Polls until no live process remains in group `pgid`.
#[track_caller]
pub fn wait_group_gone(pgid: i32) {
    poll(&format!("process group {pgid} to be gone"), || {
        let members = group_members(pgid);
        if members.is_empty() {
            Ok(())
        } else {
            Err(describe(&members))
        }
    })
}

/// Asserts, without waiting, that no live process is in group `pgid`.
#[track_caller]
pub fn assert_group_gone(pgid: i32) {
    let members = group_members(pgid);
    assert!(
        members.is_empty(),
        "process group {pgid} still has live members: {}",
        describe(&members)
    );
}

/// Polls until group `pgid` has at least `n` live members; returns them.
#[track_caller]
pub fn wait_group_size(pgid: i32, n: usize) -> Vec<i32> {
    poll(
        &format!("process group {pgid} to have {n} live members"),
        || {
            let members = group_members(pgid);
            if members.len() >= n {
                Ok(members)
            } else {
                Err(describe(&members))
            }
        },
    )
}

/// Every live process of run `id` of daemon `d`: its environment carries
/// `CYRNEL_PROCESS_ID=<id>` (a process may change its group, session or
/// parent, not its inherited environment), and it is this daemon's: at
/// sandbox level `full` its uid is in the daemon's block; otherwise its
/// `CYRNEL_OUTPUT` lies in the daemon's run folder base.
pub fn alive_of_run(d: &Daemon, id: i64) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let tag = format!("CYRNEL_PROCESS_ID={id}");
    let (base, count) = d.uid_block();
    let output = d
        .runs_base()
        .map(|b| format!("CYRNEL_OUTPUT={}/{id}/output", b.display()));
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let (Ok(env), Ok(meta)) = (
            fs::read(format!("/proc/{pid}/environ")),
            fs::metadata(format!("/proc/{pid}")),
        ) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let ours = (meta.uid() >= base && meta.uid() - base < count)
            || output
                .as_ref()
                .is_some_and(|o| vars.contains(&o.as_bytes()));
        if ours
            && vars.contains(&tag.as_bytes())
            && proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
        {
            out.push(pid);
        }
    }
    out
}

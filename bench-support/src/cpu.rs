//! CPU time, of this process and of a server process, the machine's load, and this process's
//! resident memory: what the benches divide by the cycles they count (or the locks they hold)
//! to give CPU per cycle on each side of the connection, and memory per held lock.

use std::time::Duration;

/// User + system CPU time of this process so far, every thread (`getrusage(RUSAGE_SELF)`).
pub fn process() -> Duration {
    // SAFETY: `getrusage` only writes the struct it is given, which is zeroed and ours.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// User + system CPU time of process `pid` so far, every thread (`utime` + `stime` of
/// `/proc/<pid>/stat`, in clock ticks: 10 ms resolution at the usual 100 Hz, so only a window
/// of many cycles gives a useful figure per cycle). `None` when the process is gone.
pub fn of_process(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    // Then field 3 (state) is the first, and utime and stime (fields 14 and 15) the 12th and
    // 13th.
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_second(),
    ))
}

fn ticks_per_second() -> f64 {
    // SAFETY: `sysconf` reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The machine's load average (`/proc/loadavg`: 1, 5 and 15 minutes, runnable/total
/// threads), to print beside figures measured on a machine other work may share.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The resident set of this process, from `/proc/self/status`.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

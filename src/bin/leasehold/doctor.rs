//! `leasehold doctor`: reads the settings of a deployment that decide whether its locks are
//! safe, and says what to change.
//!
//! Each check gives one [`Finding`]: `ok`, `warning` (safe as configured, but one change or
//! failure away from unsafe, or unknowable from here) or `danger` (a held lock can be lost or
//! granted twice). The command exits 1 if any finding is a danger.
//!
//! Redis (`redis.rs` beside this file): eviction policy, persistence, replication, the
//! server's clock, round-trip latency against the ttl, the server version. etcd (`etcd.rs`):
//! members and quorum, the leader, alarms, database size against its quota, round-trip latency,
//! the server version.

use std::fmt;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::store::BackendUrl;
use crate::StoreArgs;

mod etcd;
mod redis;

/// The budget of one call to the store: `doctor` is meant to answer within about 2 s against
/// a healthy local server, and to say which call did not answer rather than hang.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// How many round trips the latency check times.
const LATENCY_SAMPLES: usize = 5;

#[derive(Args, Debug)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON object: {"backend", "findings": [{"check", "severity", "found",
    /// "advice"}], "dangerous", "elapsed_ms"}.
    #[arg(long)]
    json: bool,
    /// The lease ttl your applications use (the `run` default is 30s): latency is judged
    /// against it.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    ttl: Duration,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Severity {
    Ok,
    Warning,
    Danger,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Danger => "danger",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check's answer.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    /// What was checked, e.g. `maxmemory-policy`.
    pub(crate) check: &'static str,
    pub(crate) severity: Severity,
    /// What the store said, in a sentence.
    pub(crate) found: String,
    /// What to change; empty when nothing needs to.
    pub(crate) advice: String,
}

impl Finding {
    pub(crate) fn ok(check: &'static str, found: impl Into<String>) -> Self {
        Finding {
            check,
            severity: Severity::Ok,
            found: found.into(),
            advice: String::new(),
        }
    }

    pub(crate) fn warning(
        check: &'static str,
        found: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Finding {
            check,
            severity: Severity::Warning,
            found: found.into(),
            advice: advice.into(),
        }
    }

    pub(crate) fn danger(
        check: &'static str,
        found: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Finding {
            check,
            severity: Severity::Danger,
            found: found.into(),
            advice: advice.into(),
        }
    }
}

pub(crate) async fn doctor(args: DoctorArgs) -> u8 {
    let started = Instant::now();
    let findings = match &args.store.backend {
        BackendUrl::Redis(url) => redis::check(url.as_str(), args.ttl).await,
        BackendUrl::Etcd(url) => etcd::check(url, args.ttl).await,
    };
    let elapsed = started.elapsed();
    let dangerous = findings.iter().any(|f| f.severity == Severity::Danger);
    let shown = args.store.backend.shown();
    if args.json {
        let findings: Vec<_> = findings
            .iter()
            .map(|f| {
                json!({
                    "check": f.check,
                    "severity": f.severity.as_str(),
                    "found": f.found,
                    "advice": f.advice,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "backend": shown,
                "findings": findings,
                "dangerous": dangerous,
                "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            })
        );
    } else {
        print!("{}", report(&shown, &findings));
        println!(
            "{} in {elapsed:.1?}",
            if dangerous {
                "DANGER: locks on this store are not safe as configured"
            } else {
                "nothing dangerous found"
            }
        );
    }
    u8::from(dangerous)
}

/// The findings as text: one line per finding, the advice indented under it.
fn report(shown: &str, findings: &[Finding]) -> String {
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = format!("leasehold doctor: {shown}\n");
    for finding in findings {
        let severity = match finding.severity {
            Severity::Ok => "ok",
            Severity::Warning => "WARNING",
            Severity::Danger => "DANGER",
        };
        out.push_str(&format!(
            "  {severity:<8} {:<width$}  {}\n",
            finding.check, finding.found
        ));
        if !finding.advice.is_empty() {
            out.push_str(&format!(
                "  {:<8} {:<width$}  → {}\n",
                "", "", finding.advice
            ));
        }
    }
    out
}

/// Judges a round trip against the lease ttl. A lease is renewed every ttl/3 and trusted
/// until ttl × (1 − drift) (drift 1% by default, 5% for `run`): a round trip of a tenth of
/// the ttl leaves a renewal little room to be retried in time; one above 1% eats the share of
/// the ttl the library holds back.
pub(crate) fn latency(samples: &[Duration], ttl: Duration) -> Finding {
    const CHECK: &str = "latency";
    let mut sorted = samples.to_vec();
    sorted.sort();
    let (Some(median), Some(max)) = (sorted.get(sorted.len() / 2), sorted.last()) else {
        return Finding::warning(CHECK, "no round trip was timed", "");
    };
    let found = format!(
        "round trip median {median:.1?}, max {max:.1?} over {} calls, against a ttl of {ttl:?}",
        sorted.len()
    );
    if *max * 10 >= ttl {
        Finding::danger(
            CHECK,
            found,
            format!(
                "a renewal (every ttl/3) has no room for a retry: use a ttl of at least {:?} (--ttl \
                 here, LockOptions::with_ttl in code), or a store closer to its clients",
                *max * 100
            ),
        )
    } else if *max * 100 >= ttl {
        Finding::warning(
            CHECK,
            found,
            format!(
                "round trips above 1% of the ttl eat the share leasehold holds back for clock \
                 drift: a ttl of {:?} or more is comfortable",
                *max * 100
            ),
        )
    } else {
        Finding::ok(CHECK, found)
    }
}

/// Runs `call` with the per-call budget; a call that does not answer becomes an error naming
/// it.
pub(crate) async fn bounded<T, E: fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what} failed: {error}")),
        Err(_) => Err(format!("{what} did not answer within {CALL_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_judged_against_the_ttl() {
        let ms = Duration::from_millis;
        let ttl = Duration::from_secs(30);
        assert_eq!(latency(&[ms(1), ms(2)], ttl).severity, Severity::Ok);
        assert_eq!(latency(&[ms(1), ms(400)], ttl).severity, Severity::Warning);
        assert_eq!(latency(&[ms(1), ms(3000)], ttl).severity, Severity::Danger);
        assert_eq!(latency(&[], ttl).severity, Severity::Warning);
    }

    #[test]
    fn the_report_shows_severity_and_advice() {
        let text = report(
            "redis://h",
            &[
                Finding::ok("version", "redis 7.0.15"),
                Finding::danger("maxmemory-policy", "allkeys-lru", "set noeviction"),
            ],
        );
        assert!(text.contains("ok       version"), "{text}");
        assert!(text.contains("DANGER   maxmemory-policy"), "{text}");
        assert!(text.contains("→ set noeviction"), "{text}");
    }
}

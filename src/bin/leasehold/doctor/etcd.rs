//! `doctor` on etcd: the member list, then each member's own status (asked of that member,
//! on a connection of its own), the alarms, and timed reads.
//!
//! What decides lock safety on etcd: every acquisition and renewal is a raft write or a
//! lease keep-alive, which needs a leader and a quorum; a database over its quota raises the
//! NOSPACE alarm, after which etcd refuses writes (new acquisitions fail; held leases can
//! still be kept alive, but not moved); round trips long against the ttl leave renewals no
//! room.

use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions, StatusResponse};
use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{bounded, latency, Finding};
use crate::store::EtcdUrl;

/// etcd's default `--quota-backend-bytes`.
const DEFAULT_QUOTA: i64 = 2 * 1024 * 1024 * 1024;

pub(crate) async fn check(url: &EtcdUrl, ttl: Duration) -> Vec<Finding> {
    // Without require-leader: a member that lost its leader must still answer, to say so.
    let options = url.connect_options().with_require_leader(false);
    let mut client = match bounded(
        "connect",
        Client::connect(&url.endpoints, Some(options.clone())),
    )
    .await
    {
        Ok(client) => client,
        Err(why) => {
            return vec![Finding::danger(
                "connection",
                why,
                "check the URL, that etcd runs, and that this host may reach it",
            )]
        }
    };
    let members = match bounded("member list", client.member_list()).await {
        Ok(list) => list.members().to_vec(),
        Err(why) => {
            return vec![Finding::danger(
                "connection",
                why,
                "check that etcd runs and that this user may list members",
            )]
        }
    };
    // Each member's status from that member: a status call on the shared client goes to
    // whichever endpoint the balancer picks.
    let statuses: Vec<Result<StatusResponse, String>> = join_all(members.iter().map(|member| {
        let urls = member.client_urls().to_vec();
        let options = options.clone();
        async move {
            if urls.is_empty() {
                return Err("it has not started (no client URLs)".to_owned());
            }
            let mut client = bounded("connect", Client::connect(&urls, Some(options))).await?;
            bounded("status", client.status()).await
        }
    }))
    .await;
    let mut findings = Vec::new();
    findings.push(version(&statuses));
    findings.push(quorum(&members, &statuses));
    findings.push(leader(&members, &statuses));
    findings.push(alarms(&mut client).await);
    findings.push(db_size(&members, &statuses).await);
    findings.push(round_trips(&mut client, ttl).await);
    if let Some(errors) = member_errors(&members, &statuses) {
        findings.push(errors);
    }
    findings
}

fn name(member: &etcd_client::Member) -> String {
    match member.name() {
        "" => format!("{:x}", member.id()),
        name => name.to_owned(),
    }
}

fn version(statuses: &[Result<StatusResponse, String>]) -> Finding {
    const CHECK: &str = "version";
    let mut versions: Vec<&str> = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(StatusResponse::version)
        .collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [] => Finding::warning(CHECK, "no member answered its status", ""),
        [one] => Finding::ok(CHECK, format!("etcd {one}")),
        several => Finding::warning(
            CHECK,
            format!("members run different versions: {}", several.join(", ")),
            "finish the rolling upgrade",
        ),
    }
}

fn quorum(members: &[etcd_client::Member], statuses: &[Result<StatusResponse, String>]) -> Finding {
    const CHECK: &str = "quorum";
    let voters: Vec<usize> = (0..members.len())
        .filter(|&i| !members[i].is_learner())
        .collect();
    let needed = voters.len() / 2 + 1;
    let down: Vec<String> = voters
        .iter()
        .filter_map(|&i| {
            statuses[i]
                .as_ref()
                .err()
                .map(|why| format!("{} ({why})", name(&members[i])))
        })
        .collect();
    let up = voters.len() - down.len();
    let found = format!(
        "{up} of {} voting members answer; a quorum is {needed}",
        voters.len()
    );
    if up < needed {
        Finding::danger(
            CHECK,
            format!(
                "{found}: no quorum, so no acquisition or renewal can succeed; down: {}",
                down.join(", ")
            ),
            "bring the members back (or restore the cluster from a snapshot)",
        )
    } else if !down.is_empty() {
        Finding::warning(
            CHECK,
            format!("{found}; down: {}", down.join(", ")),
            format!(
                "{} more failure(s) stop every lock: bring the members back",
                up - needed + 1
            ),
        )
    } else if voters.len().is_multiple_of(2) {
        Finding::warning(
            CHECK,
            found,
            "an even number of members tolerates no more failures than one fewer: use an odd number",
        )
    } else {
        Finding::ok(
            CHECK,
            format!("{found} (tolerates {} failure(s))", up - needed),
        )
    }
}

fn leader(members: &[etcd_client::Member], statuses: &[Result<StatusResponse, String>]) -> Finding {
    const CHECK: &str = "leader";
    let mut leaders: Vec<u64> = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(StatusResponse::leader)
        .collect();
    leaders.sort();
    leaders.dedup();
    let named = |id: u64| {
        members
            .iter()
            .find(|m| m.id() == id)
            .map_or_else(|| format!("{id:x}"), name)
    };
    match leaders.as_slice() {
        [] => Finding::danger(CHECK, "no member answered", "bring the cluster up"),
        [0] => Finding::danger(
            CHECK,
            "no leader: writes, and so acquisitions and renewals, fail",
            "restore a quorum; check the members' logs for elections",
        ),
        [one] => Finding::ok(CHECK, format!("{} leads", named(*one))),
        several => Finding::warning(
            CHECK,
            format!(
                "members disagree on the leader ({}): an election is under way or a member is cut off",
                several.iter().map(|&id| named(id)).collect::<Vec<_>>().join(", ")
            ),
            "run doctor again; if it persists, check the network between the members",
        ),
    }
}

fn member_errors(
    members: &[etcd_client::Member],
    statuses: &[Result<StatusResponse, String>],
) -> Option<Finding> {
    let errors: Vec<String> = members
        .iter()
        .zip(statuses)
        .filter_map(|(member, status)| {
            let status = status.as_ref().ok()?;
            (!status.errors().is_empty())
                .then(|| format!("{}: {}", name(member), status.errors().join("; ")))
        })
        .collect();
    (!errors.is_empty())
        .then(|| Finding::warning("member errors", errors.join(" | "), "see the members' logs"))
}

async fn alarms(client: &mut Client) -> Finding {
    const CHECK: &str = "alarms";
    match bounded(
        "alarm list",
        client.alarm(AlarmAction::Get, AlarmType::None, None),
    )
    .await
    {
        Err(why) => Finding::warning(CHECK, why, ""),
        Ok(answer) if answer.alarms().is_empty() => Finding::ok(CHECK, "none raised"),
        Ok(answer) => {
            let raised: Vec<String> = answer
                .alarms()
                .iter()
                .map(|a| format!("{} on member {:x}", a.alarm().as_str_name(), a.member_id()))
                .collect();
            Finding::danger(
                CHECK,
                format!(
                    "{}: etcd refuses writes, so new acquisitions fail",
                    raised.join(", ")
                ),
                "NOSPACE: compact and defragment (etcdctl compact, etcdctl defrag), raise \
                 --quota-backend-bytes if needed, then etcdctl alarm disarm; CORRUPT: replace \
                 the member",
            )
        }
    }
}

async fn db_size(
    members: &[etcd_client::Member],
    statuses: &[Result<StatusResponse, String>],
) -> Finding {
    const CHECK: &str = "db size";
    let Some((member, size, quota)) = members
        .iter()
        .zip(statuses)
        .filter_map(|(m, s)| s.as_ref().ok().map(|s| (m, s.db_size(), s.db_size_quota())))
        .max_by_key(|(_, size, _)| *size)
    else {
        return Finding::warning(CHECK, "no member answered its status", "");
    };
    // etcd 3.6 says its quota in the status; older versions only in their metrics, which the
    // client port serves over plain HTTP (not read here over TLS).
    let (quota, source) = if quota > 0 {
        (quota, "")
    } else if let Some(quota) = quota_from_metrics(member.client_urls()).await {
        (quota, "")
    } else {
        (
            DEFAULT_QUOTA,
            " (assumed: etcd's default, as the member does not say)",
        )
    };
    let share = size as f64 / quota as f64;
    let found = format!(
        "largest {} on {} of a {} quota{source}: {:.0}%",
        bytes(size),
        name(member),
        bytes(quota),
        share * 100.0
    );
    let advice = "compact old revisions and defragment (etcdctl compact, etcdctl defrag), or \
                  raise --quota-backend-bytes: at the quota etcd raises NOSPACE and refuses writes";
    if share >= 0.95 {
        Finding::danger(CHECK, found, advice)
    } else if share >= 0.8 {
        Finding::warning(CHECK, found, advice)
    } else {
        Finding::ok(CHECK, found)
    }
}

/// `2.0 GiB`, `39.1 KiB`.
fn bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", n / 1024.0)
    }
}

/// `etcd_server_quota_backend_bytes` from a member's `/metrics`, if one of its client URLs is
/// plain HTTP and answers.
async fn quota_from_metrics(urls: &[String]) -> Option<i64> {
    for url in urls {
        let Some(authority) = url.strip_prefix("http://") else {
            continue;
        };
        let authority = authority.trim_end_matches('/');
        let fetch = async {
            let mut conn = tokio::net::TcpStream::connect(authority).await?;
            conn.write_all(
                format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes(),
            )
            .await?;
            let mut body = String::new();
            conn.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        let Ok(body) = bounded("metrics", fetch).await else {
            continue;
        };
        let quota = body.lines().find_map(|line| {
            let value = line.strip_prefix("etcd_server_quota_backend_bytes ")?;
            value.trim().parse::<f64>().ok()
        });
        if let Some(quota) = quota {
            return Some(quota as i64);
        }
    }
    None
}

async fn round_trips(client: &mut Client, ttl: Duration) -> Finding {
    // Linearizable reads of an empty range: each goes through the leader (ReadIndex), as the
    // checks behind every renewal do.
    let probe = GetOptions::new().with_count_only();
    let mut samples = Vec::with_capacity(super::LATENCY_SAMPLES);
    for _ in 0..super::LATENCY_SAMPLES {
        let sent = Instant::now();
        if let Err(why) = bounded(
            "read",
            client.get("leasehold-doctor-probe", Some(probe.clone())),
        )
        .await
        {
            return Finding::danger("latency", why, "restore a leader and a quorum");
        }
        samples.push(sent.elapsed());
    }
    latency(&samples, ttl)
}

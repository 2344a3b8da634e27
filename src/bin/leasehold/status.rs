//! `leasehold status` and `leasehold watch`: what the store says about keys.

use std::time::Duration;

use futures::StreamExt;
use leasehold::{LockInfo, PermitHolder, StoreEventKind};
use serde_json::json;

use crate::run::fail;
use crate::{StatusArgs, WatchArgs};

pub(crate) async fn status(args: StatusArgs) -> u8 {
    let key = match (&args.prefix, &args.key) {
        (Some(prefix), _) => return list(&args, prefix).await,
        (None, Some(key)) => key.clone(),
        (None, None) => unreachable!("clap requires KEY without --prefix"),
    };
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let info = client.info(&key).await;
    // The semaphore of the same name is another thing: its holders are listed too.
    let holders = client.semaphore_holders(&key).await;
    client.shutdown().await;
    let info = match info {
        Ok(info) => info,
        Err(error) => return fail(&error),
    };
    let holders = match holders {
        Ok(holders) => holders,
        Err(error) => return fail(&error),
    };
    if args.json {
        let line = match &info {
            Some(info) => json!({
                "key": key,
                "held": true,
                "fencing_token": info.fencing_token,
                "remaining_ttl_ms": info.remaining_ttl.as_millis() as u64,
                "metadata": info.metadata,
            }),
            None => json!({ "key": key, "held": false }),
        };
        let mut line = line;
        if let Some(first) = holders.first() {
            line["semaphore"] = json!({
                "permits": first.permits.total,
                "held": holders.iter().map(|h| h.permits.count).sum::<u32>(),
                "holders": holders.iter().map(|h| json!({
                    "fencing_token": h.fencing_token,
                    "permits": h.permits.count,
                    "remaining_ttl_ms": ttl_millis(h.remaining_ttl),
                    "metadata": h.metadata,
                })).collect::<Vec<_>>(),
            });
        }
        println!("{line}");
    } else {
        match &info {
            Some(info) => println!(
                "{:?} is held: fencing token {}, {:.1?} left{}",
                key,
                info.fencing_token,
                info.remaining_ttl,
                info.metadata
                    .as_deref()
                    .map(|m| format!(", metadata {m:?}"))
                    .unwrap_or_default()
            ),
            None if holders.is_empty() => println!("{key:?} is free"),
            None => {}
        }
        if let Some(first) = holders.first() {
            let held: u32 = holders.iter().map(|h| h.permits.count).sum();
            let total = first.permits.total;
            println!("semaphore {key:?}: {held} of {total} permits held");
            print!("{}", permit_table(&holders));
        }
    }
    0
}

/// A semaphore's holders as an aligned table with a header line.
fn permit_table(holders: &[PermitHolder]) -> String {
    let rows = holders.iter().map(|holder| {
        [
            holder.fencing_token.to_string(),
            holder.permits.count.to_string(),
            format!("{:.1}s", holder.remaining_ttl.as_secs_f64()),
            holder.metadata.clone().unwrap_or_default(),
        ]
    });
    aligned(
        ["FENCING TOKEN", "PERMITS", "TTL LEFT", "METADATA"],
        rows.collect(),
    )
}

/// `status --prefix`: every held key under the prefix, read from the store directly (no lock
/// manager is started: nothing is acquired).
async fn list(args: &StatusArgs, prefix: &str) -> u8 {
    let backend = match args.store.backend.backend().await {
        Ok(backend) => backend,
        Err(error) => return fail(&error),
    };
    let held = match backend.list(prefix).await {
        Ok(held) => held,
        Err(error) => {
            eprintln!("leasehold: listing keys under {prefix:?} failed: {error}");
            return if error.kind().is_retryable() {
                crate::exit::UNAVAILABLE
            } else {
                crate::exit::SOFTWARE
            };
        }
    };
    if args.json {
        let held: Vec<_> = held
            .iter()
            .map(|info| {
                json!({
                    "key": info.key,
                    "fencing_token": info.fencing_token,
                    // null: a key without expiry (written by something other than leasehold).
                    "remaining_ttl_ms": ttl_millis(info.remaining_ttl),
                    "metadata": info.metadata,
                })
            })
            .collect();
        println!("{}", json!({ "prefix": prefix, "held": held }));
    } else {
        print!("{}", table(&held));
        eprintln!("leasehold: {} held under {prefix:?}", held.len());
    }
    0
}

fn ttl_millis(ttl: Duration) -> Option<u64> {
    (ttl != Duration::MAX).then(|| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// Held keys as an aligned table with a header line.
fn table(held: &[LockInfo]) -> String {
    let rows: Vec<[String; 4]> = held
        .iter()
        .map(|info| {
            [
                info.key.clone(),
                info.fencing_token.to_string(),
                match ttl_millis(info.remaining_ttl) {
                    Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
                    None => "never".to_owned(),
                },
                info.metadata.clone().unwrap_or_default(),
            ]
        })
        .collect();
    aligned(["KEY", "FENCING TOKEN", "TTL LEFT", "METADATA"], rows)
}

/// Rows under a header, the first column left-aligned, the middle two right-aligned.
fn aligned(header: [&str; 4], rows: Vec<[String; 4]>) -> String {
    let header = header.map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) async fn watch(args: WatchArgs) -> u8 {
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let mut events = match client.watch(&args.prefix).await {
        Ok(events) => events,
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    // Said once the store's watch is in place: every change from here on is printed.
    eprintln!("leasehold: watching keys under {:?}", args.prefix);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else {
                    eprintln!("leasehold: the store ended the watch");
                    client.shutdown().await;
                    return crate::exit::UNAVAILABLE;
                };
                let (what, token) = match event.kind {
                    StoreEventKind::Acquired { fencing_token } => ("acquired", Some(fencing_token)),
                    StoreEventKind::Released => ("released", None),
                    _ => ("changed", None),
                };
                if args.json {
                    println!("{}", json!({ "event": what, "key": event.key, "fencing_token": token }));
                } else {
                    let token = token.map(|t| format!(" (fencing token {t})")).unwrap_or_default();
                    println!("{what} {:?}{token}", event.key);
                }
            }
            _ = &mut interrupted => break,
        }
    }
    client.shutdown().await;
    0
}

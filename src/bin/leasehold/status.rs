//! `leasehold status` and `leasehold watch`: what the store says about keys.

use futures::StreamExt;
use leasehold::StoreEventKind;
use serde_json::json;

use crate::run::fail;
use crate::{StatusArgs, WatchArgs};

pub(crate) async fn status(args: StatusArgs) -> u8 {
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let info = client.info(&args.key).await;
    client.shutdown().await;
    let info = match info {
        Ok(info) => info,
        Err(error) => return fail(&error),
    };
    if args.json {
        let line = match &info {
            Some(info) => json!({
                "key": args.key,
                "held": true,
                "fencing_token": info.fencing_token,
                "remaining_ttl_ms": info.remaining_ttl.as_millis() as u64,
                "metadata": info.metadata,
            }),
            None => json!({ "key": args.key, "held": false }),
        };
        println!("{line}");
    } else {
        match &info {
            Some(info) => println!(
                "{:?} is held: fencing token {}, {:.1?} left{}",
                args.key,
                info.fencing_token,
                info.remaining_ttl,
                info.metadata
                    .as_deref()
                    .map(|m| format!(", metadata {m:?}"))
                    .unwrap_or_default()
            ),
            None => println!("{:?} is free", args.key),
        }
    }
    0
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

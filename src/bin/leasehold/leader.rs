//! `leasehold leader`: who leads NAME (value and term), and with `--watch`, each change.

use clap::Args;
use futures::StreamExt;
use leasehold::Leader;
use serde_json::json;

use crate::run::fail;
use crate::{exit, StoreArgs};

#[derive(Args, Debug)]
pub(crate) struct LeaderArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print each change after the current leader, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// The election's name.
    name: String,
}

pub(crate) async fn leader(args: LeaderArgs) -> u8 {
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let election = match client.election(&args.name) {
        Ok(election) => election,
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    if !args.watch {
        let code = match election.leader().await {
            Ok(leader) => {
                print(&args, leader.as_ref());
                0
            }
            Err(error) => fail(&error),
        };
        client.shutdown().await;
        return code;
    }
    let mut changes = match election.observe().await {
        Ok(changes) => changes,
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let code = loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(leader) => print(&args, leader.as_ref()),
                None => {
                    eprintln!("leasehold: the store ended the observation");
                    break exit::UNAVAILABLE;
                }
            },
            _ = &mut interrupted => break 0,
        }
    };
    client.shutdown().await;
    code
}

fn print(args: &LeaderArgs, leader: Option<&Leader>) {
    if args.json {
        let line = match leader {
            Some(leader) => json!({
                "name": args.name,
                "leader": true,
                "value": leader.value,
                "term": leader.term,
            }),
            None => json!({ "name": args.name, "leader": false }),
        };
        println!("{line}");
    } else {
        match leader {
            Some(leader) => println!("{:?} (term {})", leader.value, leader.term),
            None => println!("no leader"),
        }
    }
}

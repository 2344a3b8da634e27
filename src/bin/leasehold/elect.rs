//! `leasehold elect`: campaign for leadership of NAME, run a command while leader.

use std::io::ErrorKind;
use std::time::Duration;

use clap::Args;
use leasehold::{CampaignOptions, Wait};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use crate::run::{exit_code, fail, supervise};
use crate::{exit, parse_duration, StoreArgs};

#[derive(Args, Debug)]
pub(crate) struct ElectArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The value to lead with, shown to observers (default: HOSTNAME:PID).
    #[arg(long)]
    value: Option<String>,
    /// The leadership's time to live; it is renewed every ttl/3 while CMD runs. A leader that
    /// dies hands over after at most this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,
    /// How long CMD gets between SIGTERM and SIGKILL after a demotion.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The election's name.
    name: String,
    /// The command to run while leader, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub(crate) async fn elect(args: ElectArgs) -> u8 {
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let value = args.value.clone().unwrap_or_else(default_value);
    let election = match client.election(&args.name) {
        Ok(election) => election,
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    let options = CampaignOptions::new()
        .with_ttl(args.ttl)
        .with_wait(Wait::Forever);
    // Interrupted while campaigning: withdraw and exit as a shell would.
    let mut interrupts = match signal(SignalKind::interrupt()) {
        Ok(signals) => signals,
        Err(_) => return exit::SOFTWARE,
    };
    let mut terminations = match signal(SignalKind::terminate()) {
        Ok(signals) => signals,
        Err(_) => return exit::SOFTWARE,
    };
    let campaign = election.campaign(value.clone(), options);
    let leadership = tokio::select! {
        elected = campaign => match elected {
            Ok(leadership) => leadership,
            Err(error) => {
                client.shutdown().await;
                return fail(&error);
            }
        },
        _ = interrupts.recv() => {
            client.shutdown().await;
            return 128 + libc::SIGINT as u8;
        }
        _ = terminations.recv() => {
            client.shutdown().await;
            return 128 + libc::SIGTERM as u8;
        }
    };
    eprintln!(
        "leasehold: elected leader of {:?} in term {} as {value:?}",
        args.name,
        leadership.term()
    );
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let child = Command::new(program)
        .args(rest)
        .env("LEASEHOLD_ELECTION", &args.name)
        .env("LEASEHOLD_LEADER_TERM", leadership.term().to_string())
        .env("LEASEHOLD_LEADER_VALUE", &value)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            eprintln!("leasehold: cannot run {program:?}: {error}");
            let _ = leadership.resign().await;
            client.shutdown().await;
            return if error.kind() == ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let name = args.name.clone();
    let (status, demoted) = supervise(
        &mut child,
        leadership.lost(),
        |reason| format!("demoted from leading {name:?} ({reason})"),
        args.kill_grace,
        (&mut interrupts, &mut terminations),
    )
    .await;
    let resigned = if demoted {
        Ok(())
    } else {
        leadership.resign().await
    };
    client.shutdown().await;
    if demoted {
        return exit::LOST;
    }
    if let Err(error) = resigned {
        eprintln!("leasehold: resigning {:?} failed: {error}", args.name);
    }
    match status {
        Ok(status) => exit_code(status),
        Err(error) => {
            eprintln!("leasehold: lost track of the command: {error}");
            exit::SOFTWARE
        }
    }
}

/// `HOSTNAME:PID`, which names this leader to observers.
fn default_value() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

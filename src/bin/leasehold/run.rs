//! `leasehold run`: hold the lock while a child process runs.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use leasehold::{Error, LockOptions, LostReason, Wait};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{sleep_until, Instant};

use crate::{exit, RunArgs};

pub(crate) async fn run(args: RunArgs) -> u8 {
    let client = match args.store.backend.connect().await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let wait = match (args.no_wait, args.wait) {
        (true, _) => Wait::No,
        (false, Some(budget)) => Wait::UpTo(budget),
        (false, None) => Wait::Forever,
    };
    let mut options = LockOptions::new().with_ttl(args.ttl).with_wait(wait);
    if let Some(metadata) = args.metadata {
        options = options.with_metadata(metadata);
    }
    // Listening from the start: a SIGINT or SIGTERM while waiting gives up the wait, and one
    // once the command runs is passed on to it, rather than ending this process (the default)
    // and leaving the command running on its own.
    let (mut interrupts, mut terminations) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("leasehold: cannot listen for signals");
            client.shutdown().await;
            return exit::SOFTWARE;
        }
    };
    let acquiring = async {
        match args.permits {
            Some(permits) => match client.semaphore(&args.key, permits) {
                Ok(semaphore) => semaphore.acquire(options).await,
                Err(error) => Err(error),
            },
            None => client.lock(&args.key, options).await,
        }
    };
    let acquired = tokio::select! {
        acquired = acquiring => acquired,
        _ = interrupts.recv() => {
            client.shutdown().await;
            return 128 + libc::SIGINT as u8;
        }
        _ = terminations.recv() => {
            client.shutdown().await;
            return 128 + libc::SIGTERM as u8;
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(Error::Timeout { waited, .. }) => {
            eprintln!(
                "leasehold: {:?} is held by someone else (waited {waited:.1?})",
                args.key
            );
            if args.permits.is_some() {
                eprintln!("leasehold: (all its permits are held)");
            }
            client.shutdown().await;
            return args.conflict_exit_code;
        }
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut command = Command::new(program);
    command
        .args(rest)
        .env("LEASEHOLD_KEY", &args.key)
        .env("LEASEHOLD_FENCING_TOKEN", guard.fencing_token().to_string());
    if let Some(permits) = args.permits {
        command.env("LEASEHOLD_PERMITS", permits.to_string());
    }
    let child = command.spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            eprintln!("leasehold: cannot run {program:?}: {error}");
            let _ = guard.release().await;
            client.shutdown().await;
            // As shells do: 127 for a command not found, 126 for one that cannot run.
            return if error.kind() == ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };

    let key = args.key.clone();
    let (status, lost) = supervise(
        &mut child,
        guard.lost(),
        |reason| format!("lease on {key:?} lost ({reason})"),
        args.kill_grace,
        (&mut interrupts, &mut terminations),
    )
    .await;
    let released = if lost { Ok(()) } else { guard.release().await };
    client.shutdown().await;
    if lost {
        return exit::LOST;
    }
    if let Err(error) = released {
        // The command ran to its end under the lock; the lease will expire by itself.
        eprintln!("leasehold: releasing {:?} failed: {error}", args.key);
    }
    match status {
        Ok(status) => exit_code(status),
        Err(error) => {
            eprintln!("leasehold: lost track of the command: {error}");
            exit::SOFTWARE
        }
    }
}

/// Waits for `child` to end, passing SIGINT and SIGTERM on to it. When `lost` resolves first
/// (the lock or the leadership is gone, told before its deadline), says `told(reason)` and
/// sends the command SIGTERM at once, then SIGKILL after `kill_grace`. The command's exit
/// status, and whether `lost` came first. Shared by `run` and `elect`.
pub(crate) async fn supervise(
    child: &mut Child,
    lost: impl Future<Output = LostReason>,
    told: impl Fn(LostReason) -> String,
    kill_grace: Duration,
    (interrupts, terminations): (&mut Signal, &mut Signal),
) -> (std::io::Result<ExitStatus>, bool) {
    let mut lost = std::pin::pin!(lost);
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            reason = &mut lost, if kill_at.is_none() => {
                // No longer ours: stop the work now, before anyone else can take over, and
                // give the command a grace period to clean up.
                eprintln!("leasehold: {}; sending SIGTERM to the command", told(reason));
                send(child, libc::SIGTERM);
                kill_at = Some(Instant::now() + kill_grace);
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                eprintln!("leasehold: the command outlived its {kill_grace:?} grace; sending SIGKILL");
                send(child, libc::SIGKILL);
                kill_at = Some(Instant::now() + kill_grace * 1000);
            }
            _ = interrupts.recv() => send(child, libc::SIGINT),
            _ = terminations.recv() => send(child, libc::SIGTERM),
        }
    };
    (status, kill_at.is_some())
}

/// Signals the child if it is still running.
pub(crate) fn send(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) takes any pid and signal number; the worst outcome is an error.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

/// The command's exit code, or 128 + the signal that ended it, as shells report it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        _ => exit::SOFTWARE,
    }
}

/// Reports an error and picks its exit code.
pub(crate) fn fail(error: &Error) -> u8 {
    eprintln!("leasehold: {error}");
    if error.is_invalid_input() {
        exit::USAGE
    } else if error.is_retryable() {
        exit::UNAVAILABLE
    } else {
        exit::SOFTWARE
    }
}

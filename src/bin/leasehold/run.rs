//! `leasehold run`: hold the lock while a child process runs.

use std::io::ErrorKind;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use leasehold::{Error, LockOptions, Wait};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
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
    let guard = match client.lock(&args.key, options).await {
        Ok(guard) => guard,
        Err(Error::Timeout { waited, .. }) => {
            eprintln!(
                "leasehold: {:?} is held by someone else (waited {waited:.1?})",
                args.key
            );
            client.shutdown().await;
            return args.conflict_exit_code;
        }
        Err(error) => {
            client.shutdown().await;
            return fail(&error);
        }
    };
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let child = Command::new(program)
        .args(rest)
        .env("LEASEHOLD_KEY", &args.key)
        .env("LEASEHOLD_FENCING_TOKEN", guard.fencing_token().to_string())
        .spawn();
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

    let (mut interrupts, mut terminations) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("leasehold: cannot listen for signals");
            let _ = child.kill().await;
            return exit::SOFTWARE;
        }
    };
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            reason = guard.lost(), if kill_at.is_none() => {
                // The lock is no longer ours: stop the work now, before anyone else can
                // take the key, and give the command a grace period to clean up.
                eprintln!("leasehold: lease on {:?} lost ({reason}); sending SIGTERM to the command", args.key);
                send(&child, libc::SIGTERM);
                kill_at = Some(Instant::now() + args.kill_grace);
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                eprintln!("leasehold: the command outlived its {:?} grace; sending SIGKILL", args.kill_grace);
                send(&child, libc::SIGKILL);
                kill_at = Some(Instant::now() + args.kill_grace * 1000);
            }
            _ = interrupts.recv() => send(&child, libc::SIGINT),
            _ = terminations.recv() => send(&child, libc::SIGTERM),
        }
    };
    let lost = kill_at.is_some();
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

/// Signals the child if it is still running.
fn send(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) takes any pid and signal number; the worst outcome is an error.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

/// The command's exit code, or 128 + the signal that ended it, as shells report it.
fn exit_code(status: ExitStatus) -> u8 {
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

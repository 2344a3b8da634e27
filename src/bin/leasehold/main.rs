//! `leasehold`: hold a distributed lock while a command runs, like `flock(1)` across machines.
//!
//! ```text
//! leasehold run    [--backend URL] [--ttl DUR] [--wait DUR | --no-wait] KEY -- CMD [ARGS…]
//! leasehold status [--backend URL] [--json] KEY
//! leasehold watch  [--backend URL] [--json] [PREFIX]
//! leasehold status [--backend URL] [--json] --prefix PREFIX
//! leasehold doctor [--backend URL] [--json] [--ttl DUR]
//! leasehold completions SHELL
//! leasehold man
//! ```
//!
//! Exit codes: the command's own for `run`; 64 usage error; 69 store unreachable; 75 key held
//! by someone else (not acquired within the wait); 76 lease lost while the command ran;
//! `doctor`: 0 when nothing it found is dangerous, 1 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

mod doctor;
mod elect;
mod leader;
mod run;
mod status;
mod store;

use store::BackendUrl;

/// Exit codes, from sysexits.h where one fits.
mod exit {
    /// EX_USAGE: the command line was wrong.
    pub const USAGE: u8 = 64;
    /// EX_SOFTWARE: an internal error.
    pub const SOFTWARE: u8 = 70;
    /// EX_UNAVAILABLE: the store could not be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_TEMPFAIL: the key is held by someone else.
    pub const TEMPFAIL: u8 = 75;
    /// The lease was lost while the command ran.
    pub const LOST: u8 = 76;
}

/// Hold a distributed lock while a command runs.
#[derive(Parser, Debug)]
#[command(name = "leasehold", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Acquire KEY (or, with --permits N, one of the N permits of the semaphore KEY), run CMD
    /// while holding it (renewing), release it when CMD exits.
    ///
    /// CMD gets LEASEHOLD_KEY and LEASEHOLD_FENCING_TOKEN in its environment. leasehold exits
    /// with CMD's exit code; 75 if the key was not acquired within the wait; 76 if the lease
    /// was lost while CMD ran (CMD is sent SIGTERM at once, SIGKILL after --kill-grace).
    Run(RunArgs),
    /// Show whether KEY is held: fencing token, remaining ttl, metadata, and the holders of the
    /// semaphore KEY if it has any; with --prefix, every held key under PREFIX as a table.
    Status(StatusArgs),
    /// Print acquisitions and releases of keys under PREFIX as the store sees them, until
    /// interrupted.
    Watch(WatchArgs),
    /// Campaign for leadership of NAME, run CMD while leader, resign when CMD exits.
    ///
    /// CMD gets LEASEHOLD_ELECTION, LEASEHOLD_LEADER_TERM and LEASEHOLD_LEADER_VALUE in its
    /// environment. Exit codes as for `run`; 76 if demoted while CMD ran (CMD is sent SIGTERM
    /// at once, before the lease's deadline, and SIGKILL after --kill-grace).
    Elect(elect::ElectArgs),
    /// Show who leads NAME (value and term); with --watch, each change after that.
    Leader(leader::LeaderArgs),
    /// Check a deployment's settings that decide lock safety (eviction, persistence,
    /// replicas, clocks, latency; on etcd members, leader, quorum, database size) and say what
    /// to change. Exits 1 if anything found is dangerous.
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Args, Debug)]
struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
struct StoreArgs {
    /// The store: redis://[user:password@]host[:port][/db], rediss://… (TLS),
    /// redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master-name[/db],
    /// rediss+sentinel://… (TLS), redis+cluster://[[user]:password@]host:port[,host:port…],
    /// rediss+cluster://… (TLS), or etcd://[user:password@]host:port[,host:port…][?mode=txn|lock], etcds://…[?ca=FILE]
    /// [&cert=FILE&key=FILE] (TLS).
    #[arg(long, env = "LEASEHOLD_BACKEND", value_parser = BackendUrl::parse)]
    backend: BackendUrl,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The lease's time to live; it is renewed every ttl/3 while CMD runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,
    /// Wait at most this long for the key (default: wait until it is free).
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Do not wait: exit 75 at once if the key is held.
    #[arg(long)]
    no_wait: bool,
    /// A short text stored with the lock, shown by `status`.
    #[arg(long)]
    metadata: Option<String>,
    /// Hold one of N permits of the semaphore KEY instead of the lock KEY: at most N such
    /// commands run at once, on any number of machines. Every caller of KEY must give the
    /// same N while any of them holds a permit. CMD also gets LEASEHOLD_PERMITS.
    #[arg(long, value_name = "N")]
    permits: Option<u32>,
    /// The exit code when the key is not acquired.
    #[arg(long, default_value_t = exit::TEMPFAIL)]
    conflict_exit_code: u8,
    /// How long CMD gets between SIGTERM and SIGKILL after the lease is lost.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The lock's key.
    key: String,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// List every held key that starts with PREFIX instead of one key.
    #[arg(long, value_name = "PREFIX", conflicts_with = "key")]
    prefix: Option<String>,
    /// The lock's key.
    #[arg(required_unless_present = "prefix")]
    key: Option<String>,
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only keys that start with this (default: every key).
    #[arg(default_value = "")]
    prefix: String,
}

/// `500ms`, `30s`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("duration {text:?} does not start with a number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => {
            return Err(format!(
                "duration {text:?} has an unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let usage = error.use_stderr();
            let _ = error.print();
            return ExitCode::from(if usage { exit::USAGE } else { 0 });
        }
    };
    if !matches!(cli.command, Command::Run(_)) {
        // Printing commands (status, watch, completions, …) end quietly when their reader
        // goes away (`leasehold watch | head`), as Unix tools do, instead of panicking on
        // the broken pipe. Not `run`: it holds a lock, which it must release on the way out.
        // SAFETY: at the start of `main`, before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match &cli.command {
        Command::Completions(args) => {
            clap_complete::generate(
                args.shell,
                &mut Cli::command(),
                "leasehold",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("leasehold: cannot write the man page: {error}");
                    ExitCode::from(exit::SOFTWARE)
                }
            };
        }
        _ => {}
    }
    // Both TLS stacks (redis's and etcd-client's) are rustls built with ring; naming the
    // provider keeps them working when another build of the crate graph adds a second one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("leasehold: cannot start the async runtime: {error}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Watch(args) => status::watch(args).await,
            Command::Elect(args) => elect::elect(args).await,
            Command::Leader(args) => leader::leader(args).await,
            Command::Doctor(args) => doctor::doctor(args).await,
            Command::Completions(_) | Command::Man => unreachable!("answered above"),
        }
    });
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["30", "s", "5 s", "3d", ""] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}

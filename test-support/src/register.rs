//! A shared register for safety tests: one integer behind a [`Fence`], served over TCP on a free
//! loopback port from inside the test process, so lock holders in this process and in child
//! processes use the same resource. It is the resource a lock protects, seen from outside
//! the library: it only knows fencing tokens, and it records every access for a checker.
//!
//! # Protocol
//! One request per line, one answer per line:
//!
//! | request                           | answer                                   |
//! |-----------------------------------|------------------------------------------|
//! | `READ`                            | `VALUE <v>` (not fenced: for the checker) |
//! | `READ <token> <client>`           | `VALUE <v>`, or `STALE <newest>`         |
//! | `WRITE <token> <value> <client>`  | `OK`, or `STALE <newest>`                |
//!
//! A fenced read presents the token too: a resource that let a superseded holder read would
//! let it base a write on a value the newer holder is about to change, and the write of the
//! older holder could come first (and be accepted) — a lost update the fence alone on writes
//! cannot stop.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use leasehold::Fence;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What an access did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A fenced read.
    Read,
    /// A fenced write.
    Write,
}

/// One fenced access, as the register saw it.
#[derive(Debug, Clone)]
pub struct Op {
    /// Read or write.
    pub kind: OpKind,
    /// The fencing token presented.
    pub token: u64,
    /// The value read, or the value the client asked to write.
    pub value: u64,
    /// Who asked (the client name in the request).
    pub client: String,
    /// When the register answered.
    pub at: SystemTime,
    /// False when the fence refused the token.
    pub accepted: bool,
}

/// The fence refused a token: a holder with token `newest` has used the register since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// The newest token the register has accepted.
    pub newest: u64,
}

#[derive(Default)]
struct State {
    fence: Fence,
    value: u64,
    log: Vec<Op>,
}

/// The running register. Dropping it stops the server and every connection.
pub struct Register {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl Register {
    /// Starts serving on a free port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> Register {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the register's port");
        let addr = listener.local_addr().expect("register address");
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(serve(listener, state.clone()));
        Register {
            addr,
            state,
            server,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.state.lock().unwrap().value
    }

    /// Every fenced access so far, in the order the fence saw them.
    pub fn log(&self) -> Vec<Op> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for Register {
    fn drop(&mut self) {
        // The connection tasks live in the server task's JoinSet and are aborted with it.
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve_connection(stream, state.clone()));
            }
            // Reap finished connections so the set does not grow with every client.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<Mutex<State>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = answer(&line, &state);
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn answer(line: &str, state: &Mutex<State>) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
    // The fence check, the value and the log entry change under one lock, so the log order
    // is the order in which the fence saw the tokens.
    let mut state = state.lock().unwrap();
    match (words.as_slice(), number(1), number(2)) {
        (["READ"], _, _) => format!("VALUE {}", state.value),
        (["READ", _, client], Some(token), _) => {
            let value = state.value;
            let checked = state.fence.accept(token);
            state.log.push(Op {
                kind: OpKind::Read,
                token,
                value,
                client: client.to_string(),
                at: SystemTime::now(),
                accepted: checked.is_ok(),
            });
            match checked {
                Ok(()) => format!("VALUE {value}"),
                Err(stale) => format!("STALE {}", stale.newest),
            }
        }
        (["WRITE", _, _, client], Some(token), Some(value)) => {
            let checked = state.fence.accept(token);
            if checked.is_ok() {
                state.value = value;
            }
            state.log.push(Op {
                kind: OpKind::Write,
                token,
                value,
                client: client.to_string(),
                at: SystemTime::now(),
                accepted: checked.is_ok(),
            });
            match checked {
                Ok(()) => "OK".to_owned(),
                Err(stale) => format!("STALE {}", stale.newest),
            }
        }
        _ => format!("ERROR cannot parse {line:?}"),
    }
}

/// One connection to a [`Register`], possibly from another process.
pub struct RegisterClient {
    addr: SocketAddr,
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl RegisterClient {
    /// Connects to the register at `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<RegisterClient> {
        let (read, write) = TcpStream::connect(addr).await?.into_split();
        Ok(RegisterClient {
            addr,
            lines: BufReader::new(read).lines(),
            write,
        })
    }

    /// The value, without presenting a token.
    pub async fn read(&mut self) -> io::Result<u64> {
        match self.call("READ").await? {
            Answer::Value(value) => Ok(value),
            other => Err(self.unexpected("READ", other)),
        }
    }

    /// The value, if `token` is not older than the newest the register has seen.
    pub async fn read_fenced(
        &mut self,
        token: u64,
        client: &str,
    ) -> io::Result<Result<u64, Stale>> {
        let request = format!("READ {token} {client}");
        match self.call(&request).await? {
            Answer::Value(value) => Ok(Ok(value)),
            Answer::Stale(newest) => Ok(Err(Stale { newest })),
            other => Err(self.unexpected(&request, other)),
        }
    }

    /// Writes `value`, if `token` is not older than the newest the register has seen.
    pub async fn write(
        &mut self,
        token: u64,
        value: u64,
        client: &str,
    ) -> io::Result<Result<(), Stale>> {
        let request = format!("WRITE {token} {value} {client}");
        match self.call(&request).await? {
            Answer::Ok => Ok(Ok(())),
            Answer::Stale(newest) => Ok(Err(Stale { newest })),
            other => Err(self.unexpected(&request, other)),
        }
    }

    async fn call(&mut self, request: &str) -> io::Result<Answer> {
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        let line = self.lines.next_line().await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("register at {} closed the connection", self.addr),
            )
        })?;
        let mut words = line.split_whitespace();
        let answer = match (
            words.next(),
            words.next().map(str::parse::<u64>),
            words.next(),
        ) {
            (Some("OK"), None, None) => Answer::Ok,
            (Some("VALUE"), Some(Ok(value)), None) => Answer::Value(value),
            (Some("STALE"), Some(Ok(newest)), None) => Answer::Stale(newest),
            _ => Answer::Other(line),
        };
        Ok(answer)
    }

    fn unexpected(&self, request: &str, answer: Answer) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "register at {} answered {answer:?} to {request:?}",
                self.addr
            ),
        )
    }
}

#[derive(Debug)]
enum Answer {
    Ok,
    Value(u64),
    Stale(u64),
    // Read only through `Debug`, in the error that reports an unexpected answer.
    #[allow(dead_code)]
    Other(String),
}

//! Just enough of the Redis protocol (RESP2) to ask a server or a sentinel about its state
//! while a topology starts or fails over, over a plain TCP stream with a read timeout, so a
//! dead or frozen server is an error instead of a hang (and this crate needs no Redis client).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

/// How long one question may take.
const ANSWER_WITHIN: Duration = Duration::from_millis(500);

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    /// `+OK` and the like.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` (lossily as UTF-8), or `None` for a null.
    Bulk(Option<String>),
    /// `*n`, or `None` for a null array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string.
    pub fn text(&self) -> Option<&str> {
        match self {
            Resp::Simple(text) | Resp::Bulk(Some(text)) => Some(text),
            _ => None,
        }
    }

    /// The value of an integer reply.
    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// The elements of an array (none for anything else).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }

    /// An array of alternating names and values (`SENTINEL master`, `SENTINEL replicas`'
    /// entries) as pairs.
    pub fn fields(&self) -> Vec<(&str, &str)> {
        self.items()
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?.text()?, pair.get(1)?.text()?)))
            .collect()
    }

    /// The value of `name` in such an array.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields()
            .into_iter()
            .find_map(|(key, value)| (key == name).then_some(value))
    }
}

/// Sends one command to the server on `127.0.0.1:port` and reads its reply.
pub fn command(port: u16, args: &[&str]) -> io::Result<Resp> {
    let mut conn = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), ANSWER_WITHIN)?;
    conn.set_read_timeout(Some(ANSWER_WITHIN))?;
    conn.set_write_timeout(Some(ANSWER_WITHIN))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    conn.write_all(&request)?;
    read(&mut BufReader::new(conn))
}

fn read(reader: &mut impl BufRead) -> io::Result<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    let number = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match kind {
        "+" => Resp::Simple(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                Resp::Bulk(Some(String::from_utf8_lossy(&body).into_owned()))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some(
                (0..len).map(|_| read(reader)).collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad()),
    })
}

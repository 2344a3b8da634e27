//! A `ractor_cluster` node for the tests that run nodes in several OS processes: a
//! `NodeServer` listening on a free loopback port.
//!
//! Included by the test files that need it with
//! `#[path = "support/cluster_node.rs"] mod cluster_node;`.

use std::net::{IpAddr, Ipv4Addr, TcpListener};

use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

/// Every node listens and connects on the loopback interface only.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the node `name` (cluster cookie `cookie`) on a free loopback port: its server
/// actor and that port.
pub async fn node(name: &str, cookie: &str) -> (ActorRef<NodeServerMessage>, u16) {
    let port = free_port();
    let server = NodeServer::new(
        port,
        cookie.into(),
        name.into(),
        "127.0.0.1".into(),
        None,
        None,
    )
    .with_listen_addr(LOOPBACK);
    let (server, _join) = Actor::spawn(None, server, ()).await.unwrap();
    (server, port)
}

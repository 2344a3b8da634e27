//! Issue 19's scenario with a real pause, for a resource behind any of the store fences: a
//! holder process (the test binary, started again: `child.rs`), renewing its lease as usual,
//! writes through the fence, and is frozen (SIGSTOP) past its ttl; another holder takes the key
//! and writes; the frozen one is thawed and, before it looks at its lock, writes with its old
//! token: refused, nothing written.
//!
//! Each fenced test file brings the store ([`FencedValue`] for its fence), a lock manager
//! for the parent, and an `#[ignore]`d child entry that calls [`child_side`].

use std::time::Duration;

use leasehold::{LockClient, LockOptions, StaleToken, Wait};

use crate::child::{self, ChildTest};

/// The lock key, for the child.
pub const ENV_KEY: &str = "LEASEHOLD_PAUSED_HOLDER_KEY";
/// The resource's name in the store, for the child.
pub const ENV_RESOURCE: &str = "LEASEHOLD_PAUSED_HOLDER_RESOURCE";

/// The child's lease: short, so the key frees soon after the child is frozen.
const TTL: Duration = Duration::from_secs(1);
/// The child has to start, and each step to happen, within this.
const WITHIN: Duration = Duration::from_secs(30);

/// One value in a store, written through the store's fence.
#[allow(async_fn_in_trait)] // used only in these tests, never as `dyn` or across threads
pub trait FencedValue {
    /// Writes `value` through the fence with `token`; panics if the store fails.
    async fn write(&mut self, token: u64, value: &str) -> Result<(), StaleToken>;
    /// The value, read without the fence.
    async fn read(&mut self) -> Option<String>;
}

/// The parent's side: starts `entry` (a child entry of this test binary that calls
/// [`child_side`]) with `env` and the lock key and resource name added, freezes it once it
/// holds and has written, takes the key on `node`, writes, and resumes it: its late write
/// must be refused and leave the next holder's value in place.
pub async fn parent_side(
    entry: &'static str,
    env: &[(&str, String)],
    node: &LockClient,
    key: &str,
    resource_name: &str,
    resource: &mut impl FencedValue,
) {
    let mut env = env.to_vec();
    env.extend([
        (ENV_KEY, key.to_owned()),
        (ENV_RESOURCE, resource_name.to_owned()),
    ]);
    let mut child = ChildTest::spawn(entry, &env);
    let holding = child.next_tagged("HOLDING", WITHIN, |_| {}).await;
    let old_token: u64 = holding["token"].parse().unwrap();
    assert_eq!(resource.read().await.as_deref(), Some("child, in time"));

    child.stop();
    // The child cannot renew now: the key frees when its ttl runs out (a bounded wait).
    let next = node
        .lock(
            key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(15))),
        )
        .await
        .unwrap();
    assert!(next.fencing_token() > old_token);
    resource
        .write(next.fencing_token(), "next holder")
        .await
        .unwrap();

    child.resume();
    child.send("write").await;
    let late = child.next_tagged("LATE", WITHIN, |_| {}).await;
    assert_eq!(
        (late["outcome"].as_str(), late["newest"].as_str()),
        ("refused", next.fencing_token().to_string().as_str()),
        "the frozen holder's late write with token {old_token}\n{}",
        child.output()
    );
    assert_eq!(resource.read().await.as_deref(), Some("next holder"));
    child.finish(WITHIN).await;
    next.release().await.unwrap();
}

/// The child's side: takes the lock on `node` (1 s ttl, renewing), writes, reports its token,
/// then on `write` writes again with that token and reports what the fence said.
pub async fn child_side(node: LockClient, resource: &mut impl FencedValue) {
    let key = child::var(ENV_KEY);
    let guard = node
        .try_lock(&key, LockOptions::new().with_ttl(TTL))
        .await
        .unwrap()
        .expect("the key is free");
    let token = guard.fencing_token();
    resource.write(token, "child, in time").await.unwrap();
    child::report(&format!("HOLDING token={token}"));

    let mut commands = child::commands();
    child::expect_command(&mut commands, "write").await;
    // A stale process does not look before it writes: the fence is what stops it.
    match resource.write(token, "child, too late").await {
        Err(stale) => child::report(&format!("LATE outcome=refused newest={}", stale.newest)),
        Ok(()) => child::report("LATE outcome=accepted newest=-"),
    }
    drop(guard);
    node.shutdown().await;
}

//! etcd watches: how waiters learn of a release, what a failed attempt tells them, and the
//! monitoring stream of acquisitions and releases.

use etcd_client::{EventType, KeyValue, WatchOptions, WatchStream};

use super::call::{store_error, Retry};
use super::lock_mode::unescape_name;
use super::values::{token, Holder};
use super::{EtcdBackend, EtcdMode};
use crate::backend::{Contention, StoreEvent, StoreEventKind};
use crate::error::StoreError;

impl EtcdBackend {
    /// What a failed attempt tells its waiters: the revision it saw, from which their watch
    /// starts, and how long the holder's lease has left, which bounds their backstop timer.
    pub(super) async fn contention(&self, holder: Option<&KeyValue>, revision: i64) -> Contention {
        let remaining = match holder {
            // Best effort: without it the backstop timer just uses its cap.
            Some(kv) => self.remaining(kv.lease()).await.ok().flatten(),
            None => None,
        };
        Contention {
            remaining_ttl: remaining,
            revision: Some(revision),
        }
    }

    /// Opens a watch and waits for etcd to confirm it with its `created` answer, which comes
    /// before any event: from then on no event is missed, also for a watch without a start
    /// revision.
    pub(super) async fn open_watch(
        &self,
        watched: String,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        let mut watch = self
            .call("watch", Retry::IfConnectionBroke, || {
                let mut watches = self.shared.client.watch_client();
                let (watched, options) = (watched.clone(), options.clone());
                async move { watches.watch(watched, Some(options)).await }
            })
            .await?;
        match watch.message().await {
            Ok(Some(created)) if created.created() && !created.canceled() => Ok(watch),
            Ok(other) => Err(StoreError::unavailable(format!(
                "etcd did not create the watch on {watched:?}: {other:?}"
            ))),
            Err(error) => Err(store_error("watch", error)),
        }
    }

    /// What a watch event on a lock key means for monitoring, if anything.
    ///
    /// `txn` mode: creating the key is an acquisition (a later put on it, moving it to a longer
    /// lease, is not), deleting it a release. `lock` mode: an acquisition is leasehold writing
    /// its value onto its contender key (the key's second version; the first is the Lock
    /// service queueing the contender), a release is the delete of a key that had such a
    /// value. Holders that use the Lock service directly are not seen.
    pub(super) fn store_event(&self, event: &etcd_client::Event) -> Option<StoreEvent> {
        let kv = event.kv()?;
        let etcd_key = std::str::from_utf8(kv.key()).ok()?;
        let key = self.key_of(etcd_key)?;
        let kind = match (event.event_type(), self.mode) {
            (EventType::Put, EtcdMode::Txn) if kv.version() == 1 => StoreEventKind::Acquired {
                fencing_token: token(kv.create_revision()).ok()?,
            },
            (EventType::Put, EtcdMode::Lock)
                if kv.version() == 2 && Holder::decode(kv.value()).is_some() =>
            {
                StoreEventKind::Acquired {
                    fencing_token: token(kv.create_revision()).ok()?,
                }
            }
            (EventType::Delete, EtcdMode::Txn) => StoreEventKind::Released,
            (EventType::Delete, EtcdMode::Lock)
                if event
                    .prev_kv()
                    .is_some_and(|prev| Holder::decode(prev.value()).is_some()) =>
            {
                StoreEventKind::Released
            }
            _ => return None,
        };
        Some(StoreEvent { key, kind })
    }

    /// The application's key for an etcd key this backend wrote: the lock key (`txn` mode) or
    /// a contender key `NAME/<lease>` (`lock` mode).
    pub(super) fn key_of(&self, etcd_key: &str) -> Option<String> {
        let rest = etcd_key.strip_prefix(&*self.prefix)?;
        if rest.contains('\u{1f}') {
            return None; // a semaphore's or read-write lock's key (`semaphore.rs`, `rwlock.rs`)
        }
        match self.mode {
            EtcdMode::Txn => Some(rest.to_owned()),
            EtcdMode::Lock => {
                let (name, _lease) = rest.rsplit_once('/')?;
                Some(unescape_name(name))
            }
        }
    }
}

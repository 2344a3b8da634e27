//! The conformance suite on the in-process store, with tokio's clock paused: ttl expiry and
//! renewal are tested in virtual time.

leasehold::conformance_suite!(paused, leasehold::MemoryBackend::new());
leasehold::election_suite!(paused, leasehold::MemoryBackend::new());

mod semaphore {
    leasehold::semaphore_suite!(paused, leasehold::MemoryBackend::new());
}

mod rwlock {
    leasehold::rwlock_suite!(paused, leasehold::MemoryBackend::new());
}

mod fair {
    leasehold::fair_suite!(paused, leasehold::MemoryBackend::new());
}

/// A store that holds locks only (a third-party backend that has not implemented read-write
/// locks): asking it for a read share or the write hold is a clear, non-retryable error at
/// once, whether the caller tries once or waits, never a wrong grant or a hang.
mod rwlock_unsupported {
    use std::time::Duration;

    use async_trait::async_trait;
    use leasehold::testing::{start, unique_key};
    use leasehold::{
        Acquisition, Contention, ErrorKind, Lease, LockBackend, LockInfo, LockOptions,
        MemoryBackend, OwnerToken, ReleaseNotices, StoreError, StoreErrorKind, Wait,
    };

    #[derive(Clone, Default)]
    struct LocksOnly(MemoryBackend);

    #[async_trait]
    impl LockBackend for LocksOnly {
        fn kind(&self) -> &'static str {
            "locks-only"
        }
        async fn acquire(
            &self,
            key: &str,
            owner: OwnerToken,
            ttl: Duration,
            metadata: Option<&str>,
        ) -> Result<Acquisition, StoreError> {
            self.0.acquire(key, owner, ttl, metadata).await
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
            self.0.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
            self.0.release(lease).await
        }
        async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
            self.0.inspect(key).await
        }
        async fn subscribe(
            &self,
            key: &str,
            seen: &Contention,
        ) -> Result<ReleaseNotices, StoreError> {
            self.0.subscribe(key, seen).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_without_read_write_locks_says_so_at_once() {
        let client = start(LocksOnly::default()).await;
        let rw = client.rwlock(&unique_key("rw-unsupported")).unwrap();
        let waiting = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(60)));
        let answers = [
            rw.try_read(LockOptions::new()).await.map(|_| ()),
            rw.try_write(LockOptions::new()).await.map(|_| ()),
            rw.read(waiting.clone()).await.map(|_| ()),
            rw.write(waiting).await.map(|_| ()),
        ];
        for answer in answers {
            let err = answer.unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::Store(StoreErrorKind::Unsupported),
                "{err:?}"
            );
            assert!(!err.is_retryable());
            assert!(
                err.to_string()
                    .contains("the locks-only store does not support read-write locks"),
                "{err}"
            );
        }
        // Nor can it wait fairly: refused at once, before any I/O.
        let fair = LockOptions::new().with_fair(true);
        let err = client.try_lock("plain", fair).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Store(StoreErrorKind::Unsupported),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("the locks-only store does not support fair waiting"),
            "{err}"
        );
        // Locks on it still work.
        let lock = client.try_lock("plain", LockOptions::new()).await.unwrap();
        assert!(lock.is_some());
        drop(lock);
        client.shutdown().await;
    }
}

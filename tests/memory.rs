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

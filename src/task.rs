//! Tasks owned by an actor's state.

use ractor::concurrency::JoinHandle;

/// A task (usually a ractor timer) that is aborted when its owner drops it, so a timer kept in
/// an actor's state dies with the state instead of firing into a stopped actor.
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

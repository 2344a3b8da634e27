//! The live heap: bytes allocated and not yet freed, counted by a wrapper around the system
//! allocator when `--heap` turns it on. Beside the resident set it tells what the locks keep
//! from what the allocator holds on to (freed memory it has not given back, fragments).
//!
//! Off, each allocation pays one relaxed load of a flag nobody writes; on, one relaxed add to
//! a shared counter as well, which costs CPU: the figures of a `--heap` run are for memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static ON: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicI64 = AtomicI64::new(0);

pub struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as i64));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as i64 - layout.size() as i64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count(bytes: i64) {
    if ON.load(Ordering::Relaxed) {
        LIVE.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Starts counting, at the start of the run (what was allocated before is never freed into
/// the count: the figures are differences between two readings).
pub fn turn_on() {
    ON.store(true, Ordering::Relaxed);
}

/// Bytes allocated since counting began and not freed, or `None` when it is off.
pub fn live_bytes() -> Option<i64> {
    ON.load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}

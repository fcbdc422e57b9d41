//! Test-only: a global allocator that counts the allocations each thread makes, so a unit
//! test can show that a per-datagram path allocates nothing. Compiled only under `cfg(test)`.
//!
//! Invariant: it forwards every call unchanged to the system allocator; the count is a
//! thread-local `Cell` (const-initialised, no destructor), so counting itself never allocates
//! and tests running in parallel do not see each other's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

fn count() {
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments, so the caller's
// obligations under the GlobalAlloc contract are exactly System's.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds GlobalAlloc::alloc's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, i.e. from System; forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System; forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How many allocations (including reallocations) `f` made on this thread.
pub fn during(f: impl FnOnce()) -> u64 {
    let now = || COUNT.with(Cell::get);
    let before = now();
    f();
    now() - before
}

#[cfg(test)]
mod tests {
    /// The counter sees an allocation and a reallocation, and nothing when nothing happens.
    #[test]
    fn counts() {
        assert_eq!(super::during(|| {}), 0);
        let n = super::during(|| {
            let mut v: Vec<u8> = Vec::with_capacity(1);
            v.extend_from_slice(&[1, 2, 3]);
            std::hint::black_box(&v);
        });
        assert_eq!(n, 2);
    }
}

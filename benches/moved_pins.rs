//! Memory of the record of moved sticky pins, measured by counting what the
//! allocator hands out (not computed from the layout).
//!
//! `cargo bench --bench moved_pins`: fills one pool's record to its bound
//! (`MAX_MOVED_PINS`) and prints the heap bytes per entry, at the bound and
//! at a few smaller sizes (a hash map grows by doubling, so the figure
//! depends on how full its last doubling is).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use sluice::registry::{MAX_MOVED_PINS, MovedPins};

/// The system allocator, counting the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a
// counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let now = Instant::now();
    let until = now + Duration::from_secs(3600);
    println!("moved pins: heap bytes per entry (counted at the allocator)");
    for n in [1_000, 10_000, 50_000, MAX_MOVED_PINS] {
        let before = LIVE.load(Ordering::Relaxed);
        let pins = MovedPins::default();
        for i in 1..=n as u64 {
            // An odd multiplier is a bijection: distinct, nonzero nonces,
            // spread like random ones.
            assert!(pins.record(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 7, now, until));
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "  {n:>7} entries: {bytes:>9} B, {:.1} B per entry",
            bytes as f64 / n as f64
        );
        assert_eq!(pins.len(), n);
        // One more past the bound is refused: the record stays bounded.
        if n == MAX_MOVED_PINS {
            assert!(!pins.record(u64::MAX, 7, now, until));
        }
    }
}

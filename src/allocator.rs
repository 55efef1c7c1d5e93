//! The process's memory allocator, which also counts the bytes each thread holds so that the Rhai
//! sandbox can bound what one evaluation allocates (Rhai's own limits apply to each value, not to
//! their sum: a map of 1 MiB strings grew to 2.8 GB before any of them failed).
//!
//! With the default `mimalloc` feature: mimalloc for blocks under 128 KiB, glibc's malloc for
//! larger ones. mimalloc's per-thread free lists take the hot path's many small, short-lived blocks
//! without glibc's arena locks (under load, ~14% less CPU per alert). Large blocks stay with glibc,
//! which maps each one fresh from the kernel, so the pages of one that is never fully written stay
//! unbacked. sled sets up 41 histograms of 512 KiB when it opens: with mimalloc for every block,
//! ~20 MiB of them became resident, against ~5 MiB this way. Without the feature, glibc alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Blocks at least this large go to the system allocator; glibc maps blocks of this size and
/// more with their own `mmap` (its default `M_MMAP_THRESHOLD`).
#[cfg(feature = "mimalloc")]
const LARGE: usize = 128 * 1024;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread. A block freed by another thread than
    /// the one that allocated it moves the two counts apart; only differences over a stretch of
    /// code that stays on one thread mean anything.
    static HELD: Cell<isize> = const { Cell::new(0) };
}

/// This thread's allocated-minus-freed bytes so far: compare two readings taken on one thread.
/// Always 0 where [`Allocator`] is not the global allocator.
pub fn thread_held() -> isize {
    HELD.try_with(Cell::get).unwrap_or(0)
}

fn count(delta: isize) {
    // A `const`, drop-free thread-local: reading it never allocates, and it is never torn down.
    let _ = HELD.try_with(|h| h.set(h.get().wrapping_add(delta)));
}

/// Routes each block by its size and counts it. A block's size is the same when it is freed as
/// when it was allocated, so each block returns to the allocator it came from.
pub struct Allocator;

/// Whether a block of `size` bytes comes from mimalloc (else glibc).
#[inline]
fn small(size: usize) -> bool {
    #[cfg(feature = "mimalloc")]
    return size < LARGE;
    #[cfg(not(feature = "mimalloc"))]
    return {
        let _ = size;
        false
    };
}

/// Forwards `$call` to mimalloc or glibc by the size `$size`.
macro_rules! routed {
    ($size:expr, $method:ident($($arg:expr),*)) => {{
        #[cfg(feature = "mimalloc")]
        if small($size) {
            unsafe { mimalloc::MiMalloc.$method($($arg),*) }
        } else {
            unsafe { System.$method($($arg),*) }
        }
        #[cfg(not(feature = "mimalloc"))]
        unsafe { System.$method($($arg),*) }
    }};
}

// SAFETY: each call is forwarded to an allocator that upholds `GlobalAlloc`, chosen by the
// layout's size; `dealloc` and `realloc` receive the layout the block was allocated with, so they
// reach the same allocator. `realloc` across the threshold allocates from the other allocator,
// copies the smaller of the two sizes and frees the old block. Counting touches only a
// thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = routed!(layout.size(), alloc(layout));
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = routed!(layout.size(), alloc_zeroed(layout));
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        routed!(layout.size(), dealloc(ptr, layout));
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = if small(layout.size()) == small(new_size) {
            routed!(layout.size(), realloc(ptr, layout, new_size))
        } else {
            // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does
            // not overflow `isize`.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let new = routed!(new_size, alloc(new_layout));
            if !new.is_null() {
                unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                routed!(layout.size(), dealloc(ptr, layout));
            }
            new
        };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    fn fill(p: *mut u8, n: usize) {
        for i in 0..n {
            unsafe { p.add(i).write(i as u8 ^ 0x5a) };
        }
    }

    fn check(p: *const u8, n: usize) {
        for i in 0..n {
            assert_eq!(unsafe { p.add(i).read() }, i as u8 ^ 0x5a, "byte {i}");
        }
    }

    #[test]
    fn each_thread_counts_what_it_holds() {
        // The lib's unit tests run with `Allocator` as the global allocator (lib.rs).
        let before = thread_held();
        let v = vec![0u8; 3 << 20];
        let held = thread_held() - before;
        assert!(held >= 3 << 20, "{held}");
        drop(v);
        assert!(thread_held() - before < 1 << 20);
    }

    #[cfg(feature = "mimalloc")]
    #[test]
    fn reallocation_across_the_threshold_keeps_the_contents_both_ways() {
        let a = Allocator;
        for align in [8, 64, 4096] {
            let small = layout(LARGE / 2, align);
            let p = unsafe { a.alloc(small) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            fill(p, small.size());
            // Up: mimalloc to glibc.
            let p = unsafe { a.realloc(p, small, LARGE * 2) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            check(p, small.size());
            fill(p, LARGE * 2);
            // Down: glibc to mimalloc; the first 100 bytes survive.
            let p = unsafe { a.realloc(p, layout(LARGE * 2, align), 100) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            check(p, 100);
            unsafe { a.dealloc(p, layout(100, align)) };
        }
    }

    #[cfg(feature = "mimalloc")]
    #[test]
    fn zeroed_blocks_are_zero_on_both_sides_of_the_threshold() {
        let a = Allocator;
        for size in [16, LARGE - 1, LARGE, 4 * LARGE] {
            let l = layout(size, 16);
            // Dirty a block of that size first, so a reused one would show.
            let p = unsafe { a.alloc(l) };
            unsafe { p.write_bytes(0xff, size) };
            unsafe { a.dealloc(p, l) };
            let z = unsafe { a.alloc_zeroed(l) };
            assert!(!z.is_null());
            let bytes = unsafe { std::slice::from_raw_parts(z, size) };
            assert!(bytes.iter().all(|b| *b == 0), "{size} bytes");
            unsafe { a.dealloc(z, l) };
        }
    }
}

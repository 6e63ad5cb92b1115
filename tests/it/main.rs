//! The integration test binary: one crate for all of tests/it, so it links lmgate once.

mod fuzz_replay;
mod reference;
mod sse;

// The gateway over real sockets: in-process gateway, scripted upstream, raw client.
mod connections;
mod embeddings;
mod harness;
mod limits;
mod origin;
mod pools;
mod reload;
mod request_bytes;
mod response_bytes;
mod shutdown;
mod tls;
mod transport;
mod upstream_failure;
mod validation;

// Translation and forwarding: hand-written expectations, frames per read, zero allocations per
// event.
mod alloc;
mod anthropic;
mod anthropic_failure;
mod azure;
mod frames;
mod gemini;
mod ollama;
/// A global allocator that counts this thread's allocations while `count` runs.
pub mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    fn tick() {
        if ON.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
    }

    // SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
    // const-initialised thread-locals, which never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            tick();
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            tick();
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            tick();
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Allocations made by this thread while `f` runs.
    pub fn count(f: impl FnOnce()) -> u64 {
        COUNT.with(|c| c.set(0));
        ON.with(|o| o.set(true));
        f();
        ON.with(|o| o.set(false));
        COUNT.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;
mod bench;

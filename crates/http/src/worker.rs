//! Which worker runtime the current thread belongs to. Each worker runtime keeps its own idle
//! upstream connections and its own Redis connection, indexed by this slot.

/// Most worker runtimes a process runs; slot 0 is the control runtime.
pub const MAX_WORKERS: usize = 64;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `id` (1-based), so it uses its own idle-connection list:
/// a connection is driven by the runtime that opened it, so it is reused only from there.
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id.min(MAX_WORKERS)));
}

/// The current thread's worker id (0 for the control runtime).
pub fn worker_slot() -> usize {
    WORKER.with(|w| w.get())
}

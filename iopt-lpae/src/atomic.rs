//! The atomics the reclamation protocol uses: `core`'s, or `loom`'s when the `loom` feature is
//! on, so that the model checker runs the protocol's real code (`checkers/tests/loom_reclaim.rs`)
//! instead of a copy of it.

#[cfg(feature = "loom")]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, fence};

#[cfg(not(feature = "loom"))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, fence};

/// The limbo's lock: a spin lock (`no_std`), or loom's mutex, which the model checker can
/// schedule around.
#[cfg(feature = "loom")]
pub(crate) type Mutex<T> = loom::sync::Mutex<T>;
#[cfg(not(feature = "loom"))]
pub(crate) type Mutex<T> = spin::Mutex<T>;

/// Locks `m` (the two mutexes differ only in that loom's returns a `Result`).
#[cfg(feature = "loom")]
pub(crate) fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
#[cfg(not(feature = "loom"))]
#[inline]
pub(crate) fn lock<T>(m: &Mutex<T>) -> spin::MutexGuard<'_, T> {
    m.lock()
}

/// Orders the entry into an operation (a sequentially consistent read-modify-write just
/// before) against the loads that follow. On x86 the locked read-modify-write already is a
/// full fence, so only the compiler must be held back (as crossbeam-epoch does); elsewhere,
/// and under the model checker, a real fence.
#[inline]
pub(crate) fn full_fence_after_rmw() {
    #[cfg(all(
        not(feature = "loom"),
        any(target_arch = "x86", target_arch = "x86_64")
    ))]
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    #[cfg(any(
        feature = "loom",
        not(any(target_arch = "x86", target_arch = "x86_64"))
    ))]
    fence(core::sync::atomic::Ordering::SeqCst);
}

/// Waits a moment for another thread to finish what it started (a claimed table's unlink):
/// a spin hint, or under the model checker a yield, so that it schedules the other thread.
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(feature = "loom")]
    loom::thread::yield_now();
    #[cfg(not(feature = "loom"))]
    core::hint::spin_loop();
}

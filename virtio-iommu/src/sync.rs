//! Synchronisation primitives of the DMA tracker.
//!
//! Under `--cfg loom` they come from loom so that the pin/drain protocol can
//! be model-checked with exactly the code that runs in production.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, RwLock,
};

#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, RwLock,
};

/// Locks a mutex, ignoring poisoning: every critical section of the tracker
/// leaves its data consistent before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> crate::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks an `RwLock`, ignoring poisoning (see [`lock`]).
pub(crate) fn read<T>(l: &RwLock<T>) -> crate::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks an `RwLock`, ignoring poisoning (see [`lock`]).
pub(crate) fn write<T>(l: &RwLock<T>) -> crate::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(loom)]
pub(crate) use loom::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

/// A reader-writer lock whose readers are spread over several locks: a
/// reader takes one (the one its caller names), a writer takes all of them
/// in order.
///
/// A read lock is an atomic read-modify-write of the lock word: readers on
/// several CPUs taking one `RwLock` pass its cache line between them on
/// every read, which made pins through one domain from two threads several
/// times slower than from one. Readers naming different shards share no
/// line. Writes (MAP, UNMAP, the end of a domain) are rarer and pay one
/// lock per shard.
///
/// Invariant: the value is read only under one shard's read lock and
/// written only under every shard's write lock, so a writer excludes every
/// reader and every other writer, exactly as one `RwLock` would.
pub(crate) struct ShardedRwLock<T, const N: usize> {
    shards: [Padded<RwLock<()>>; N],
    value: UnsafeCell<T>,
}

impl<T, const N: usize> std::fmt::Debug for ShardedRwLock<T, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedRwLock")
            .field("shards", &N)
            .finish_non_exhaustive()
    }
}

/// Keeps each shard's lock word on cache lines of its own.
#[repr(align(128))]
struct Padded<T>(T);

// SAFETY: the lock hands out `&T` to readers on several threads at once
// (needs `T: Sync`) and `&mut T` to one writer on any thread (needs
// `T: Send`), never both at once (the invariant above); that is what
// `std::sync::RwLock<T>` requires of `T` for the same reasons.
unsafe impl<T: Send + Sync, const N: usize> Sync for ShardedRwLock<T, N> {}
// SAFETY: moving the lock moves the value; nothing in it is tied to a thread.
unsafe impl<T: Send, const N: usize> Send for ShardedRwLock<T, N> {}

impl<T, const N: usize> ShardedRwLock<T, N> {
    /// A lock with `N` reader shards (`N` a power of two).
    pub(crate) fn new(value: T) -> Self {
        const { assert!(N.is_power_of_two()) };
        ShardedRwLock {
            shards: std::array::from_fn(|_| Padded(RwLock::new(()))),
            value: UnsafeCell::new(value),
        }
    }

    /// Read-locks shard `shard` (modulo `N`).
    pub(crate) fn read(&self, shard: usize) -> ShardedReadGuard<'_, T> {
        let lock = read(&self.shards[shard & (N - 1)].0);
        ShardedReadGuard {
            _lock: lock,
            value: self.value.get(),
        }
    }

    /// Write-locks every shard, in order (so writers never deadlock).
    pub(crate) fn write(&self) -> ShardedWriteGuard<'_, T, N> {
        // `from_fn` walks the array forward: the locks are taken in order.
        let locks = std::array::from_fn(|i| write(&self.shards[i].0));
        ShardedWriteGuard {
            _locks: locks,
            value: self.value.get_mut(),
        }
    }
}

/// Shared access to a [`ShardedRwLock`]'s value.
pub(crate) struct ShardedReadGuard<'a, T> {
    _lock: RwLockReadGuard<'a, ()>,
    value: cell::ConstPtr<T>,
}

impl<T> std::ops::Deref for ShardedReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds a shard's read lock, so no writer holds
        // the value (the lock's invariant) for as long as the reference,
        // which borrows the guard, lives.
        unsafe { self.value.deref() }
    }
}

/// Exclusive access to a [`ShardedRwLock`]'s value.
pub(crate) struct ShardedWriteGuard<'a, T, const N: usize> {
    _locks: [RwLockWriteGuard<'a, ()>; N],
    value: cell::MutPtr<T>,
}

impl<T, const N: usize> std::ops::Deref for ShardedWriteGuard<'_, T, N> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds every shard's write lock: no reader and
        // no other writer holds the value while the reference lives.
        unsafe { self.value.deref() }
    }
}

impl<T, const N: usize> std::ops::DerefMut for ShardedWriteGuard<'_, T, N> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`; the `&mut self` borrow makes this the
        // only reference derived from the guard while it lives.
        unsafe { self.value.deref() }
    }
}

#[cfg(loom)]
use loom::cell::{self, UnsafeCell};

#[cfg(not(loom))]
use std_cell::{self as cell, UnsafeCell};

/// loom's `UnsafeCell` interface over std's, so that the sharded lock is
/// the same code in the models and in production.
#[cfg(not(loom))]
mod std_cell {
    /// See `loom::cell::UnsafeCell`.
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    /// A pointer for shared access.
    pub(crate) struct ConstPtr<T>(*const T);

    /// A pointer for exclusive access.
    pub(crate) struct MutPtr<T>(*mut T);

    impl<T> UnsafeCell<T> {
        pub(crate) fn new(v: T) -> Self {
            UnsafeCell(std::cell::UnsafeCell::new(v))
        }
        pub(crate) fn get(&self) -> ConstPtr<T> {
            ConstPtr(self.0.get())
        }
        pub(crate) fn get_mut(&self) -> MutPtr<T> {
            MutPtr(self.0.get())
        }
    }

    impl<T> ConstPtr<T> {
        /// # Safety
        /// No `&mut T` may exist while the result lives.
        pub(crate) unsafe fn deref(&self) -> &T {
            // SAFETY: the pointer comes from a live `UnsafeCell` that
            // outlives the guard holding this pointer; the caller rules
            // out a concurrent `&mut T`.
            unsafe { &*self.0 }
        }
    }

    impl<T> MutPtr<T> {
        /// # Safety
        /// No other reference to the value may exist while the result
        /// lives.
        #[allow(clippy::mut_from_ref)]
        pub(crate) unsafe fn deref(&self) -> &mut T {
            // SAFETY: as for `ConstPtr::deref`; the caller rules out any
            // other reference.
            unsafe { &mut *self.0 }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_readers_of_every_shard() {
        let l = Arc::new(ShardedRwLock::<u64, 4>::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if i % 2 == 0 {
                            let mut w = l.write();
                            // A reader sees the value between writes only:
                            // always even.
                            *w += 1;
                            *w += 1;
                        } else {
                            assert_eq!(*l.read(i) % 2, 0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.read(0), 80_000);
    }
}

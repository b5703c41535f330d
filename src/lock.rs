//! Poison-tolerant locking: the daemon's mutexes guard plain tables whose every update is
//! complete before the guard drops, so a thread that panicked while holding one leaves
//! nothing half-done behind, and the others carry on with the data.

#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock `m`, taking the data over from a panicked holder if need be.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-lock `l`, taking the data over from a panicked writer if need be.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-lock `l`, taking the data over from a panicked holder if need be.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

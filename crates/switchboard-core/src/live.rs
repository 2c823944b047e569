//! A value a running daemon may swap (on SIGHUP) while readers hold the
//! previous one: credentials a channel signs or authenticates with.

use std::sync::{Arc, RwLock};

/// A shared, swappable value. Readers take a snapshot with [`Live::get`]
/// and use it for one whole operation (a webhook, a send, a login), so an
/// operation never mixes the old and the new value.
#[derive(Debug)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// Wraps the first value.
    pub fn new(value: T) -> Self {
        Live(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        // A writer never panics while holding the lock (it only swaps an
        // Arc), so a poisoned lock still holds a whole value.
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the value; operations already running keep the old one.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    #[test]
    fn a_snapshot_outlives_a_swap() {
        let live = Live::new(String::from("old"));
        let held = live.get();
        live.set(String::from("new"));
        assert_eq!(*held, "old");
        assert_eq!(*live.get(), "new");
    }
}

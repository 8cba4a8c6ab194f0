//! Budgets: how much of a shared resource one caller may hold at once.
//!
//! Every local user may connect to guardd, so every resource a call can hold (a connection, an
//! open login, a slot on the blocking pool, an Argon2 hash) has a budget: a limit per key (a uid,
//! a target user) well below the whole, and a part of the whole that only privileged callers
//! (root) may use. No unprivileged uid can then delay a root login by using something up.
//! A refusal is immediate: nobody queues behind an attacker. The budgets and their limits:
//! docs/architecture.md#budgets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Who a holding is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A Unix uid: the caller's, or the real uid behind a root caller (sudo, su).
    Uid(u32),
    /// The user a login is for (sshd and login act for users as root).
    User(String),
    /// The user a remote login is for, from one remote host: abandoned ssh prompts from one
    /// address cannot use up that user's share for logins from elsewhere.
    Remote(String, String),
}

/// The limits of one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Holdings per key at most.
    pub per_key: usize,
    /// Holdings of unprivileged callers at most, all keys together.
    pub shared: usize,
    /// Holdings at most; `total - shared` is reserved for privileged callers.
    pub total: usize,
}

/// Why a budget refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error("too many {what} for {key}; finish some first")]
    PerKey { what: &'static str, key: String },
    #[error("too many {what} in progress on this server; try again shortly")]
    Shared { what: &'static str },
}

/// A budget over one resource; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Budget {
    what: &'static str,
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_key: HashMap<Key, usize>,
    shared: usize,
    total: usize,
}

/// One holding; given back when dropped.
#[derive(Debug)]
pub struct Holding {
    budget: Arc<Budget>,
    keys: Vec<Key>,
    shared: bool,
}

impl Budget {
    /// A budget over `what` (for messages: "open logins", "connections").
    pub fn new(what: &'static str, limits: Limits) -> Arc<Budget> {
        Arc::new(Budget {
            what,
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// Takes one holding counted against every key in `keys`; `privileged` callers may use the
    /// reserve. Refused at once when any limit is reached.
    pub fn acquire(
        self: &Arc<Self>,
        keys: Vec<Key>,
        privileged: bool,
    ) -> Result<Holding, Exhausted> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in &keys {
            if state.by_key.get(key).copied().unwrap_or(0) >= self.limits.per_key {
                return Err(Exhausted::PerKey {
                    what: self.what,
                    key: match key {
                        Key::Uid(uid) => format!("uid {uid}"),
                        Key::User(user) => format!("user {user}"),
                        Key::Remote(user, rhost) => format!("user {user} from {rhost}"),
                    },
                });
            }
        }
        let full = if privileged {
            state.total >= self.limits.total
        } else {
            state.shared >= self.limits.shared || state.total >= self.limits.total
        };
        if full {
            return Err(Exhausted::Shared { what: self.what });
        }
        for key in &keys {
            *state.by_key.entry(key.clone()).or_insert(0) += 1;
        }
        state.total += 1;
        if !privileged {
            state.shared += 1;
        }
        Ok(Holding {
            budget: self.clone(),
            keys,
            shared: !privileged,
        })
    }

    /// Holdings now: (all, unprivileged).
    pub fn in_use(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.total, state.shared)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(n) = state.by_key.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    state.by_key.remove(key);
                }
            }
        }
        state.total -= 1;
        if self.shared {
            state.shared -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_key: 2,
        shared: 3,
        total: 5,
    };

    #[test]
    fn one_key_cannot_take_more_than_its_share() {
        let b = Budget::new("logins", LIMITS);
        let _a = b.acquire(vec![Key::Uid(1000)], false).unwrap();
        let _b = b.acquire(vec![Key::Uid(1000)], false).unwrap();
        assert!(matches!(
            b.acquire(vec![Key::Uid(1000)], false),
            Err(Exhausted::PerKey { .. })
        ));
        assert!(b.acquire(vec![Key::Uid(1001)], false).is_ok());
    }

    #[test]
    fn the_reserve_is_for_privileged_callers_only() {
        let b = Budget::new("logins", LIMITS);
        let held: Vec<_> = (0..3)
            .map(|uid| b.acquire(vec![Key::Uid(uid + 1000)], false).unwrap())
            .collect();
        assert_eq!(
            b.acquire(vec![Key::Uid(2000)], false).unwrap_err(),
            Exhausted::Shared { what: "logins" }
        );
        let root1 = b.acquire(vec![Key::User("root".into())], true).unwrap();
        let _root2 = b.acquire(vec![Key::User("alice".into())], true).unwrap();
        assert!(b.acquire(vec![Key::User("bob".into())], true).is_err());
        drop(root1);
        drop(held);
        assert_eq!(b.in_use(), (1, 0));
    }

    #[test]
    fn a_root_caller_acting_for_a_user_counts_against_that_user() {
        let b = Budget::new("logins", LIMITS);
        // sudo run by uid 1000: privileged, but counted against uid 1000 too.
        let _a = b.acquire(vec![Key::Uid(1000)], true).unwrap();
        let _b = b.acquire(vec![Key::Uid(1000)], true).unwrap();
        assert!(b.acquire(vec![Key::Uid(1000)], true).is_err());
    }

    #[test]
    fn permits_give_back_every_key_on_drop() {
        let b = Budget::new("logins", LIMITS);
        for _ in 0..10 {
            let p = b
                .acquire(vec![Key::Uid(7), Key::User("x".into())], false)
                .unwrap();
            drop(p);
        }
        assert_eq!(b.in_use(), (0, 0));
        assert!(b.state.lock().unwrap().by_key.is_empty());
    }
}

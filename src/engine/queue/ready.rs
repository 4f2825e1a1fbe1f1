//! The ready index: the receivable messages, lowest id first.
//!
//! A set of ready ids cost 8 bytes per message of a backlog nobody consumes yet, though a
//! sent message is ready at once and has the highest id: the message map (ordered by id, with
//! each message's state) already lists it in its place. So the index is a cursor into the map
//! and a small set:
//!
//! - **at and above [`Queue::ready_from`]**, every message whose state is ready is in the
//!   index, read off the map (a send costs nothing);
//! - **below it**, the ready messages are in `ready_below`, a [`SortedSet`] of ids: those that
//!   became ready after the cursor passed them (a visibility timeout that ran out, a delay that
//!   ended, a release, a rewind, a dead letter with an old id).
//!
//! Every id in `ready_below` is below the cursor, so the lowest ready id is the set's first,
//! or else the first ready message at the cursor. A receive that takes a message from the map
//! moves the cursor past it; the cursor also moves past messages that are not ready (in
//! flight, delayed, deleted into the rewind area) at the start of every operation
//! ([`Queue::settle_ready`]), each of them once, so finding the next ready message passes over
//! at most what one operation changed.

use super::{Queue, State};

impl Queue {
    /// Message `id`, whose state is (being made) ready, joins the ready index.
    pub(super) fn ready_insert(&mut self, id: u64) {
        self.ready_len += 1;
        if id < self.ready_from {
            self.ready_below.insert(id);
        }
    }

    /// Message `id`, ready until now, leaves the ready index.
    pub(super) fn ready_remove(&mut self, id: u64) {
        self.ready_len = self.ready_len.saturating_sub(1);
        if id < self.ready_from {
            self.ready_below.remove(&id);
        }
    }

    /// Ready messages.
    pub(super) fn ready_count(&self) -> usize {
        self.ready_len
    }

    /// The first ready message at or after the cursor.
    fn ready_run_first(&self) -> Option<u64> {
        self.messages
            .range_from(self.ready_from)
            .find(|(_, m)| m.state() == State::Ready)
            .map(|(&id, _)| id)
    }

    /// Moves the cursor to the first ready message at or after it, past every message that
    /// is not ready (or past the map's last id), and returns that message.
    pub(super) fn settle_ready(&mut self) -> Option<u64> {
        let mut last = None;
        for (&id, m) in self.messages.range_from(self.ready_from) {
            if m.state() == State::Ready {
                self.ready_from = id;
                return Some(id);
            }
            last = Some(id);
        }
        if let Some(last) = last {
            self.ready_from = last.saturating_add(1);
        }
        None
    }

    /// Takes the lowest ready id out of the index (the caller changes the message's state).
    pub(super) fn ready_pop_first(&mut self) -> Option<u64> {
        let run = self.settle_ready();
        let id = if let Some(below) = self.ready_below.pop_first() {
            below
        } else {
            let id = run?;
            self.ready_from = id.saturating_add(1);
            id
        };
        self.ready_len = self.ready_len.saturating_sub(1);
        Some(id)
    }

    /// The lowest ready id.
    pub(super) fn first_ready(&self) -> Option<u64> {
        self.ready_below
            .first()
            .copied()
            .or_else(|| self.ready_run_first())
    }

    /// Every ready id, lowest first.
    pub(super) fn ready_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ready_below.iter().copied().chain(
            self.messages
                .range_from(self.ready_from)
                .filter(|(_, m)| m.state() == State::Ready)
                .map(|(&id, _)| id),
        )
    }

    /// Empties the index.
    pub(super) fn clear_ready(&mut self) {
        self.ready_below.clear();
        self.ready_len = 0;
        self.ready_from = 0;
    }

    /// Whether message `id`, in the map, is in the ready index (tests).
    #[cfg(test)]
    pub(super) fn ready_contains(&self, id: u64) -> bool {
        if id < self.ready_from {
            self.ready_below.contains(&id)
        } else {
            self.messages
                .get(&id)
                .is_some_and(|m| m.state() == State::Ready)
        }
    }

    /// The ready index's invariants, message by message (tests only).
    #[cfg(test)]
    pub(super) fn assert_ready_consistent(&self) {
        let ready: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| m.state() == State::Ready)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(ready.len(), self.ready_len, "ready count");
        assert_eq!(
            self.ready_ids().collect::<Vec<_>>(),
            ready,
            "the ready index lists the ready messages, lowest id first"
        );
        for id in self.ready_below.iter() {
            assert!(
                *id < self.ready_from,
                "ready id {id} kept at or above the cursor"
            );
        }
        assert_eq!(self.first_ready(), ready.first().copied(), "first ready id");
    }
}

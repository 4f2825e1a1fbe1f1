//! [`ById`]: the messages of one queue in the replay model, by id.
//!
//! Message ids are handed out in increasing order and a queue is used at both ends (sends
//! append, receives and deletes take from the front), so in a replay nearly every insert is of
//! an id above every other and nearly every removal is near the front. A deque in id order does
//! both in O(1) with no allocation per message, where a B-tree searches from its root and
//! allocates a node every few inserts (measured: recovering a log of 3 million sends spent about
//! a fifth of its time in B-tree inserts). Lookups are a binary search.
//!
//! Ids that come out of order (a send logged after a later one, a message moved back to a queue
//! it left) are shifted into place when they land near an end of the deque, and kept in a
//! B-tree beside it otherwise, so that no insert costs more than a B-tree insert plus a short
//! shift. Removed entries leave a hole in the deque, dropped at once at either end and in bulk
//! once holes outnumber entries, so a removal costs O(1) amortized.

use std::collections::{btree_map, vec_deque, BTreeMap, VecDeque};
use std::iter::Peekable;

/// Entries an out-of-order insert may shift to land in the deque; further from an end, it goes
/// to the B-tree.
const SHIFT_MAX: usize = 64;

/// Holes the deque may hold beyond its live entries before they are dropped in bulk.
const HOLES_SLACK: usize = 64;

/// Values by id, ordered. See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ById<V> {
    /// Strictly increasing ids; `None` is a removed entry (a hole).
    run: VecDeque<(u64, Option<V>)>,
    /// Entries of `run` that are not holes.
    run_live: usize,
    /// Entries whose id was inserted out of order, far from both ends of `run`. No id is in
    /// both (as an entry or a hole of `run`).
    others: BTreeMap<u64, V>,
}

impl<V> Default for ById<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> ById<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self {
            run: VecDeque::new(),
            run_live: 0,
            others: BTreeMap::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.run_live + self.others.len()
    }

    /// Where `id` is in `run` (`Ok`, as an entry or a hole), or would go (`Err`). Searched from
    /// the nearer end, in steps doubling from it, then by halves: O(log distance), and the
    /// entries touched are those near the ends, where a replay works.
    fn find(&self, id: u64) -> Result<usize, usize> {
        let len = self.run.len();
        let (Some(&(first, _)), Some(&(last, _))) = (self.run.front(), self.run.back()) else {
            return Err(0);
        };
        if id > last {
            return Err(len);
        }
        if id < first {
            return Err(0);
        }
        let at = |i: usize| self.run.get(i).map_or(u64::MAX, |&(id, _)| id);
        // Bounds `lo..hi` with at(lo) <= id < at(hi) (`hi` may be `len`).
        let (mut lo, mut hi) = if id - first <= last - id {
            let mut step = 1;
            while step < len && at(step) <= id {
                step *= 2;
            }
            (step / 2, step.min(len))
        } else {
            let mut step = 1;
            while step < len && at(len - 1 - step) > id {
                step *= 2;
            }
            ((len - 1).saturating_sub(step), len - step / 2)
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if at(mid) <= id {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if at(lo) == id {
            Ok(lo)
        } else {
            Err(lo + 1)
        }
    }

    /// The value of `id`.
    pub fn get(&self, id: &u64) -> Option<&V> {
        match self.find(*id) {
            Ok(at) => self.run.get(at).and_then(|(_, v)| v.as_ref()),
            Err(_) => self.others.get(id),
        }
    }

    /// The value of `id`, to change.
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        match self.find(*id) {
            Ok(at) => self.run.get_mut(at).and_then(|(_, v)| v.as_mut()),
            Err(_) => self.others.get_mut(id),
        }
    }

    /// Whether `id` has a value.
    pub fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Sets the value of `id`; returns the one it replaces.
    pub fn insert(&mut self, id: u64, value: V) -> Option<V> {
        match self.find(id) {
            Ok(at) => {
                let slot = &mut self.run.get_mut(at)?.1;
                let old = slot.replace(value);
                if old.is_none() {
                    self.run_live += 1;
                }
                old
            }
            Err(at) => {
                if let Some(slot) = self.others.get_mut(&id) {
                    return Some(std::mem::replace(slot, value));
                }
                let len = self.run.len();
                if at == len {
                    self.run.push_back((id, Some(value)));
                } else if at.min(len - at) <= SHIFT_MAX {
                    // `VecDeque::insert` shifts the shorter side.
                    self.run.insert(at, (id, Some(value)));
                } else {
                    self.others.insert(id, value);
                    return None;
                }
                self.run_live += 1;
                None
            }
        }
    }

    /// Removes `id`; returns its value.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        match self.find(*id) {
            Ok(at) => {
                let old = self.run.get_mut(at)?.1.take();
                if old.is_some() {
                    self.run_live -= 1;
                    self.tidy();
                }
                old
            }
            Err(_) => self.others.remove(id),
        }
    }

    /// Drops the holes at both ends of `run`, and every hole once they outnumber the entries.
    fn tidy(&mut self) {
        while self.run.front().is_some_and(|(_, v)| v.is_none()) {
            self.run.pop_front();
        }
        while self.run.back().is_some_and(|(_, v)| v.is_none()) {
            self.run.pop_back();
        }
        if self.run.len() > 2 * self.run_live + HOLES_SLACK {
            self.run.retain(|(_, v)| v.is_some());
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.run.clear();
        self.run_live = 0;
        self.others.clear();
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&u64, &mut V) -> bool) {
        for (id, slot) in &mut self.run {
            if let Some(value) = slot {
                if !keep(id, value) {
                    *slot = None;
                    self.run_live -= 1;
                }
            }
        }
        self.others.retain(|id, value| keep(id, value));
        self.tidy();
    }

    /// The entries in id order.
    pub fn iter(&self) -> Iter<'_, V> {
        Iter {
            run: Live(self.run.iter()).peekable(),
            others: self.others.iter().peekable(),
            left: self.len(),
        }
    }

    /// The values in id order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// The same entries with every value mapped (the order of calls is unspecified).
    pub fn map_values<W>(self, mut f: impl FnMut(V) -> W) -> ById<W> {
        ById {
            run: self
                .run
                .into_iter()
                .map(|(id, v)| (id, v.map(&mut f)))
                .collect(),
            run_live: self.run_live,
            others: self.others.into_iter().map(|(id, v)| (id, f(v))).collect(),
        }
    }
}

impl<'a, V> IntoIterator for &'a ById<V> {
    type Item = (&'a u64, &'a V);
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The entries of a [`ById`] in id order: the deque's merged with the B-tree's.
#[derive(Debug)]
pub(crate) struct Iter<'a, V> {
    run: Peekable<Live<'a, V>>,
    others: Peekable<btree_map::Iter<'a, u64, V>>,
    left: usize,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let other_first = match (self.run.peek(), self.others.peek()) {
            (Some((run, _)), Some((other, _))) => other < run,
            (None, Some(_)) => true,
            _ => false,
        };
        let next = if other_first {
            self.others.next()
        } else {
            self.run.next()
        };
        if next.is_some() {
            self.left = self.left.saturating_sub(1);
        }
        next
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// The entries of the deque, holes skipped.
#[derive(Debug)]
pub(crate) struct Live<'a, V>(vec_deque::Iter<'a, (u64, Option<V>)>);

impl<'a, V> Iterator for Live<'a, V> {
    type Item = (&'a u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.find_map(|(id, v)| v.as_ref().map(|v| (id, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Get(u64),
        RetainEven,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Mostly increasing, as in a log: ids near the top of the range.
            8 => (0u64..400).prop_map(Op::Insert),
            6 => (0u64..400).prop_map(Op::Remove),
            3 => (0u64..400).prop_map(Op::Get),
            1 => Just(Op::RetainEven),
            1 => Just(Op::Clear),
        ]
    }

    fn check(map: &ById<u64>, model: &BTreeMap<u64, u64>) {
        assert_eq!(map.len(), model.len());
        let got: Vec<(u64, u64)> = map.iter().map(|(&k, &v)| (k, v)).collect();
        let want: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(got, want);
        assert_eq!(map.iter().size_hint(), (model.len(), Some(model.len())));
        assert!(map
            .run
            .iter()
            .zip(map.run.iter().skip(1))
            .all(|(a, b)| a.0 < b.0));
        assert!(map.others.keys().all(|id| map.find(*id).is_err()));
        assert_eq!(
            map.run.iter().filter(|(_, v)| v.is_some()).count(),
            map.run_live
        );
    }

    proptest! {
        #[test]
        fn behaves_as_a_btreemap(ops in proptest::collection::vec(op(), 0..600), seq in any::<bool>()) {
            let mut map = ById::new();
            let mut model = BTreeMap::new();
            let mut next = 0;
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(id) => {
                        // Half the runs insert mostly in order, as a replay does.
                        let id = if seq && id % 4 != 0 { next += 1; next } else { id };
                        let value = step as u64;
                        prop_assert_eq!(map.insert(id, value), model.insert(id, value));
                    }
                    Op::Remove(id) => prop_assert_eq!(map.remove(&id), model.remove(&id)),
                    Op::Get(id) => {
                        prop_assert_eq!(map.get(&id), model.get(&id));
                        prop_assert_eq!(map.contains_key(&id), model.contains_key(&id));
                        if let Some(v) = map.get_mut(&id) {
                            *v += 1;
                        }
                        if let Some(v) = model.get_mut(&id) {
                            *v += 1;
                        }
                    }
                    Op::RetainEven => {
                        map.retain(|id, _| id % 2 == 0);
                        model.retain(|id, _| id % 2 == 0);
                    }
                    Op::Clear => {
                        map.clear();
                        model.clear();
                    }
                }
                check(&map, &model);
            }
            let mapped = map.map_values(|v| v * 2);
            let want: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v * 2)).collect();
            let got: Vec<(u64, u64)> = mapped.iter().map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn far_out_of_order_inserts_go_beside_the_deque() {
        let mut map = ById::new();
        for id in (0..2000).step_by(2) {
            map.insert(id, id);
        }
        assert!(map.others.is_empty());
        map.insert(1001, 1);
        assert_eq!(map.others.len(), 1, "in the middle: beside the deque");
        map.insert(1995, 2);
        map.insert(3, 3);
        assert_eq!(map.others.len(), 1, "near either end: shifted in");
        map.remove(&1000);
        map.insert(1000, 4);
        assert_eq!(map.others.len(), 1, "a hole is filled in place");
        assert_eq!(map.get(&1001), Some(&1));
        assert_eq!(map.len(), 1003);
        let ids: Vec<u64> = map.iter().map(|(&id, _)| id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids.len(), 1003);
    }
}

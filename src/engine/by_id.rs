//! [`ById`]: values by message id, in id order: the message map of each engine queue and of each
//! queue of the replay model.
//!
//! Message ids are handed out in increasing order and a queue is used at both ends (sends
//! append, receives and deletes take from the front), so nearly every insert is of an id above
//! every other and nearly every removal is near the front. The entries are kept in a deque of
//! chunks of at most [`CHUNK_BYTES`] of `(id, value)` pairs, each chunk a sorted vector:
//!
//! - an append goes to the last chunk, or starts a new one when it is full, so chunks filled by
//!   appends are full (a `BTreeMap` splits a full leaf in two and leaves ascending inserts'
//!   leaves about half full: measured 163 bytes per 80-byte value against 88 here);
//! - nothing is ever reallocated whole (a `VecDeque` of entries doubles and copies every entry
//!   when it grows: hundreds of MB under a queue's lock at ten million messages);
//! - a removal leaves a hole; a chunk whose entries are all holes is dropped at once, and a
//!   chunk that is mostly holes is compacted (and its allocation shrunk);
//! - an id that comes out of order (a send logged after a later one, a message moved back to a
//!   queue it left) is inserted into the chunk whose range holds it, which is split in two
//!   when it is full.
//!
//! Lookups are a binary search over the chunks, then within one. Iteration is in id order.

use std::collections::{vec_deque, VecDeque};

/// Bytes of one chunk's allocation: a size class of the allocator (mimalloc's bins are powers of
/// two here), so that a full chunk wastes nothing; 372 messages of the engine, 455 of the model.
#[cfg(not(test))]
const CHUNK_BYTES: usize = 32 * 1024;

/// Entries per chunk at most: as many as fit in [`CHUNK_BYTES`] (8 in tests, so that splits
/// and drops happen).
#[cfg(not(test))]
const fn chunk_entries(entry_bytes: usize) -> usize {
    entries_fitting(CHUNK_BYTES, entry_bytes)
}

/// How many entries of `entry_bytes` fit in `chunk_bytes`, and at least 16: the chunk size of
/// [`ById`] and of [`SortedSet`](crate::engine::sorted_set::SortedSet).
#[cfg_attr(test, allow(dead_code))]
pub(crate) const fn entries_fitting(chunk_bytes: usize, entry_bytes: usize) -> usize {
    let n = chunk_bytes / if entry_bytes == 0 { 1 } else { entry_bytes };
    if n < 16 {
        16
    } else {
        n
    }
}

#[cfg(test)]
const fn chunk_entries(_entry_bytes: usize) -> usize {
    8
}

#[derive(Debug, Clone)]
struct Chunk<V> {
    /// The id of `entries[0]`, kept beside the vector so that finding a chunk reads only the
    /// deque, not every chunk's allocation.
    first: u64,
    /// Strictly increasing ids; `None` is a removed entry (a hole).
    entries: Vec<(u64, Option<V>)>,
    /// Entries that are not holes (at least one: an empty chunk is dropped).
    live: usize,
}

impl<V> Chunk<V> {
    /// Entries at most.
    const CAP: usize = chunk_entries(std::mem::size_of::<(u64, Option<V>)>());

    /// A chunk of one entry, with room for `room` (an append's new chunk: a whole chunk).
    fn with(id: u64, value: V, room: usize) -> Self {
        let mut entries = Vec::with_capacity(room);
        entries.push((id, Some(value)));
        Self {
            first: id,
            entries,
            live: 1,
        }
    }

    fn first(&self) -> u64 {
        self.first
    }

    /// After a change to the front of `entries`.
    fn refresh_first(&mut self) {
        self.first = self.entries.first().map_or(u64::MAX, |e| e.0);
    }

    /// Where `id` is (`Ok`), or where it would go (`Err`): the first entry at or above it.
    ///
    /// Ids are strictly increasing integers, and a hole keeps its id and its place, so a
    /// chunk's ids are often evenly spaced: consecutive for a queue alone on the broker or for
    /// the log's model, a topic's subscription count apart for the copies its publishes put in
    /// each subscription's queue. So the place the spacing gives is tried first (the
    /// consecutive place, then the one the chunk's first and last ids give), and the search
    /// goes outwards from there.
    fn find(&self, id: u64) -> Result<usize, usize> {
        let offset = id.saturating_sub(self.first);
        let at_most = usize::try_from(offset).unwrap_or(usize::MAX);
        // Consecutive ids: one entry read.
        if self.entries.get(at_most).is_some_and(|e| e.0 == id) {
            return Ok(at_most);
        }
        let len = self.entries.len();
        let last = match self.entries.last() {
            Some(e) if id <= e.0 => e.0,
            _ => return Err(len),
        };
        // Evenly spaced: where the spacing puts it; near it, when the spacing is uneven (a
        // queue among others sent to at other rates).
        let span = last - self.first;
        let guess = match span {
            0 => 0,
            _ => (u128::from(offset) * (len as u128 - 1) / u128::from(span)) as usize,
        };
        gallop(&self.entries, guess.min(len - 1), id)
    }

    /// Inserts at `at`, growing the allocation by doubling but never past a chunk's capacity.
    fn insert_at(&mut self, at: usize, id: u64, value: V) {
        let len = self.entries.len();
        if len == self.entries.capacity() {
            self.entries
                .reserve_exact(len.clamp(4, Self::CAP).min(Self::CAP - len).max(1));
        }
        self.entries.insert(at, (id, Some(value)));
        self.live += 1;
        if at == 0 {
            self.first = id;
        }
    }

    /// Drops the holes; gives back memory the chunk no longer needs.
    fn compact(&mut self) {
        self.entries.retain(|e| e.1.is_some());
        self.refresh_first();
        if self.entries.capacity() > 2 * self.entries.len() + Self::CAP / 8 {
            self.entries.shrink_to(self.entries.len() + Self::CAP / 8);
        }
    }
}

/// Where `id` is in `entries` (strictly increasing ids), or where it would go: searched from
/// `from` outwards in steps that double, then by halves between the last two steps, so an id
/// near `from` costs a few reads near it.
fn gallop<V>(entries: &[(u64, V)], from: usize, id: u64) -> Result<usize, usize> {
    let at = |i: usize| entries.get(i).map(|e| e.0);
    let search = |lo: usize, hi: usize| {
        entries
            .get(lo..hi)
            .unwrap_or_default()
            .binary_search_by_key(&id, |e| e.0)
            .map(|i| i + lo)
            .map_err(|i| i + lo)
    };
    match at(from) {
        None => search(0, entries.len()),
        Some(there) if there == id => Ok(from),
        Some(there) if there < id => {
            // Up: the answer is past `from`.
            let mut lo = from + 1;
            let mut step = 1;
            loop {
                let probe = from.saturating_add(step);
                match at(probe) {
                    None => return search(lo, entries.len()),
                    Some(there) if there >= id => return search(lo, probe + 1),
                    Some(_) => lo = probe + 1,
                }
                step *= 2;
            }
        }
        Some(_) => {
            // Down: the answer is at or before `from`.
            let mut hi = from + 1;
            let mut step = 1;
            loop {
                let Some(probe) = from.checked_sub(step) else {
                    return search(0, hi);
                };
                match at(probe) {
                    Some(there) if there <= id => return search(probe, hi),
                    _ => hi = probe + 1,
                }
                step *= 2;
            }
        }
    }
}

/// Values by id, ordered. See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ById<V> {
    /// Ordered: every id of a chunk is below every id of the next.
    chunks: VecDeque<Chunk<V>>,
    /// Entries that are not holes.
    len: usize,
}

impl<V> Default for ById<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> ById<V> {
    /// Bytes of heap the map holds: its chunks' allocations (holes and spare room included)
    /// and the deque of chunks. Walks the chunks (one per few hundred entries).
    pub fn heap_bytes(&self) -> usize {
        let chunks = self.chunks.capacity() * std::mem::size_of::<Chunk<V>>();
        let entries: usize = self
            .chunks
            .iter()
            .map(|chunk| chunk.entries.capacity() * std::mem::size_of::<(u64, Option<V>)>())
            .sum();
        chunks + entries
    }

    /// An empty map.
    pub fn new() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk whose range holds `id`: the last one starting at or below it (`None` when
    /// `id` is below every chunk).
    fn chunk_for(&self, id: u64) -> Option<usize> {
        let last = self.chunks.len().checked_sub(1)?;
        let back = self.chunks.get(last)?.first();
        if back <= id {
            return Some(last);
        }
        // The front: where deletes work.
        if self.chunks.get(1).is_some_and(|c| id < c.first()) {
            return self.chunks.front().filter(|c| c.first() <= id).map(|_| 0);
        }
        // Chunks filled by appends of evenly spaced ids each span as many ids as the one
        // before the last: the one `id` is in is as many such spans before the last as the
        // distance says (where receives work, behind the deletes).
        let span = self
            .chunks
            .get(last.saturating_sub(1))
            .map_or(1, |before| back.saturating_sub(before.first()).max(1));
        let behind = (back - id).div_ceil(span);
        if let Some(guess) = usize::try_from(behind)
            .ok()
            .and_then(|behind| last.checked_sub(behind))
        {
            if self.chunk_holds(guess, id) {
                return Some(guess);
            }
        }
        self.chunks
            .partition_point(|c| c.first() <= id)
            .checked_sub(1)
    }

    /// Whether chunk `i`'s range holds `id`: it starts at or below it, the next one above it.
    fn chunk_holds(&self, i: usize, id: u64) -> bool {
        self.chunks.get(i).is_some_and(|c| c.first() <= id)
            && self.chunks.get(i + 1).is_none_or(|next| id < next.first())
    }

    /// The value of `id`.
    pub fn get(&self, id: &u64) -> Option<&V> {
        let chunk = self.chunks.get(self.chunk_for(*id)?)?;
        let at = chunk.find(*id).ok()?;
        chunk.entries.get(at).and_then(|(_, v)| v.as_ref())
    }

    /// The value of `id`, to change.
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        let i = self.chunk_for(*id)?;
        let chunk = self.chunks.get_mut(i)?;
        let at = chunk.find(*id).ok()?;
        chunk.entries.get_mut(at).and_then(|(_, v)| v.as_mut())
    }

    /// Whether `id` has a value.
    pub fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Sets the value of `id`; returns the one it replaces.
    pub fn insert(&mut self, id: u64, value: V) -> Option<V> {
        // The common case first: an id above every other (a send, a replayed send).
        if let Some(last) = self.chunks.back_mut() {
            if last.entries.last().is_some_and(|e| e.0 < id) {
                self.len += 1;
                if last.entries.len() < Chunk::<V>::CAP {
                    let at = last.entries.len();
                    last.insert_at(at, id, value);
                } else if last.live < last.entries.len() {
                    last.compact();
                    let at = last.entries.len();
                    last.insert_at(at, id, value);
                } else {
                    self.chunks
                        .push_back(Chunk::with(id, value, Chunk::<V>::CAP));
                }
                return None;
            }
        }
        let Some(i) = self.chunk_for(id).or(if self.chunks.is_empty() {
            None
        } else {
            Some(0)
        }) else {
            self.chunks
                .push_back(Chunk::with(id, value, Chunk::<V>::CAP));
            self.len += 1;
            return None;
        };
        let last = i + 1 == self.chunks.len();
        let chunk = self.chunks.get_mut(i)?;
        let at = match chunk.find(id) {
            Ok(at) => {
                let slot = &mut chunk.entries.get_mut(at)?.1;
                let old = slot.replace(value);
                if old.is_none() {
                    chunk.live += 1;
                    self.len += 1;
                }
                return old;
            }
            Err(at) => at,
        };
        self.len += 1;
        if chunk.entries.len() < Chunk::<V>::CAP {
            chunk.insert_at(at, id, value);
            return None;
        }
        if chunk.live < chunk.entries.len() {
            // Full of holes too: drop them and look again.
            chunk.compact();
            let at = chunk.find(id).err().unwrap_or(0);
            chunk.insert_at(at, id, value);
            return None;
        }
        if at == chunk.entries.len() {
            // Past the end of a full chunk: the next chunk's front, or a chunk of its own (an
            // append starts the next chunk: chunks filled by appends stay full).
            if !last {
                if let Some(next) = self.chunks.get_mut(i + 1) {
                    if next.entries.len() < Chunk::<V>::CAP {
                        next.insert_at(0, id, value);
                        return None;
                    }
                }
            }
            let room = if last { Chunk::<V>::CAP } else { 4 };
            self.chunks.insert(i + 1, Chunk::with(id, value, room));
            return None;
        }
        // Inside a full chunk: split it in two.
        let mut right = Vec::with_capacity(Chunk::<V>::CAP);
        right.extend(chunk.entries.drain(Chunk::<V>::CAP / 2..));
        chunk.live = chunk.entries.len();
        let mut right = Chunk {
            first: right.first().map_or(u64::MAX, |e| e.0),
            live: right.len(),
            entries: right,
        };
        if at <= chunk.entries.len() {
            chunk.insert_at(at, id, value);
        } else {
            let at = at - chunk.entries.len();
            right.insert_at(at, id, value);
        }
        self.chunks.insert(i + 1, right);
        None
    }

    /// Removes `id`; returns its value.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        let i = self.chunk_for(*id)?;
        let chunk = self.chunks.get_mut(i)?;
        let at = chunk.find(*id).ok()?;
        let old = chunk.entries.get_mut(at)?.1.take()?;
        chunk.live -= 1;
        self.len -= 1;
        if chunk.live == 0 {
            self.chunks.remove(i);
        } else if chunk.entries.len() >= 2 * chunk.live + Chunk::<V>::CAP / 4 {
            chunk.compact();
        }
        Some(old)
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&u64, &mut V) -> bool) {
        for chunk in &mut self.chunks {
            for (id, slot) in &mut chunk.entries {
                if let Some(value) = slot {
                    if !keep(id, value) {
                        *slot = None;
                        chunk.live -= 1;
                        self.len -= 1;
                    }
                }
            }
            if chunk.live > 0 && chunk.entries.len() >= 2 * chunk.live + Chunk::<V>::CAP / 4 {
                chunk.compact();
            }
        }
        self.chunks.retain(|c| c.live > 0);
    }

    /// The entries in id order.
    pub fn iter(&self) -> Iter<'_, V> {
        let mut chunks = self.chunks.iter();
        let current = chunks.next().map(|c| c.entries.iter()).unwrap_or_default();
        Iter {
            chunks,
            current,
            left: Some(self.len),
        }
    }

    /// The entries with an id at or above `from`, in id order.
    pub fn range_from(&self, from: u64) -> Iter<'_, V> {
        let i = self.chunk_for(from).unwrap_or(0);
        let mut chunks = self.chunks.range(i..);
        let current = chunks
            .next()
            .map(|c| {
                let (Ok(start) | Err(start)) = c.find(from);
                c.entries.get(start..).unwrap_or_default().iter()
            })
            .unwrap_or_default();
        Iter {
            chunks,
            current,
            left: None,
        }
    }

    /// The values in id order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// The same entries with every value mapped (the order of calls is unspecified).
    pub fn map_values<W>(self, mut f: impl FnMut(V) -> W) -> ById<W> {
        ById {
            chunks: self
                .chunks
                .into_iter()
                .map(|c| {
                    let mut entries = Vec::with_capacity(c.entries.capacity());
                    entries.extend(c.entries.into_iter().map(|(id, v)| (id, v.map(&mut f))));
                    Chunk {
                        first: c.first,
                        entries,
                        live: c.live,
                    }
                })
                .collect(),
            len: self.len,
        }
    }
}

impl<V> FromIterator<(u64, V)> for ById<V> {
    /// In id order, this fills whole chunks; in any order, it is as good as inserting each.
    fn from_iter<I: IntoIterator<Item = (u64, V)>>(entries: I) -> Self {
        let mut map = Self::new();
        for (id, value) in entries {
            map.insert(id, value);
        }
        map
    }
}

impl<'a, V> IntoIterator for &'a ById<V> {
    type Item = (&'a u64, &'a V);
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The entries of a [`ById`] in id order, holes skipped.
#[derive(Debug)]
pub(crate) struct Iter<'a, V> {
    chunks: vec_deque::Iter<'a, Chunk<V>>,
    current: std::slice::Iter<'a, (u64, Option<V>)>,
    /// Entries left, when known (a whole map's iteration).
    left: Option<usize>,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((id, v)) = self.current.next() {
                if let Some(v) = v {
                    if let Some(left) = &mut self.left {
                        *left = left.saturating_sub(1);
                    }
                    return Some((id, v));
                }
                continue;
            }
            self.current = self.chunks.next()?.entries.iter();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.left {
            Some(left) => (left, Some(left)),
            None => (0, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Get(u64),
        RangeFrom(u64),
        RetainEven,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Mostly increasing, as in a log: ids near the top of the range.
            8 => (0u64..400).prop_map(Op::Insert),
            6 => (0u64..400).prop_map(Op::Remove),
            3 => (0u64..400).prop_map(Op::Get),
            2 => (0u64..400).prop_map(Op::RangeFrom),
            1 => Just(Op::RetainEven),
            1 => Just(Op::Clear),
        ]
    }

    fn check(map: &ById<u64>, model: &BTreeMap<u64, u64>) {
        assert_eq!(map.len(), model.len());
        assert_eq!(map.is_empty(), model.is_empty());
        let got: Vec<(u64, u64)> = map.iter().map(|(&k, &v)| (k, v)).collect();
        let want: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(got, want);
        assert_eq!(map.iter().size_hint(), (model.len(), Some(model.len())));
        let ids: Vec<u64> = map
            .chunks
            .iter()
            .flat_map(|c| c.entries.iter().map(|e| e.0))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        for chunk in &map.chunks {
            assert!(chunk.live > 0, "an empty chunk is kept");
            assert!(chunk.entries.len() <= Chunk::<u64>::CAP);
            assert_eq!(chunk.first, chunk.entries[0].0, "first out of date");
            assert_eq!(
                chunk.entries.iter().filter(|e| e.1.is_some()).count(),
                chunk.live
            );
        }
    }

    proptest! {
        #[test]
        fn behaves_as_a_btreemap(
            ops in proptest::collection::vec(op(), 0..600),
            seq in any::<bool>(),
            spacing in 1u64..4,
        ) {
            let mut map = ById::new();
            let mut model = BTreeMap::new();
            let mut next = 0;
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(id) => {
                        // Half the runs insert mostly in order, as a replay does, `spacing` apart
                        // (a topic's copies are its subscription count apart in each queue).
                        let id = if seq && id % 4 != 0 { next += spacing; next } else { id };
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
                    Op::RangeFrom(from) => {
                        let got: Vec<(u64, u64)> =
                            map.range_from(from).map(|(&k, &v)| (k, v)).collect();
                        let want: Vec<(u64, u64)> =
                            model.range(from..).map(|(&k, &v)| (k, v)).collect();
                        prop_assert_eq!(got, want);
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

    /// The galloping search agrees with a binary search from every starting place, for every
    /// id around and between the entries.
    #[test]
    fn gallop_agrees_with_a_binary_search() {
        let shapes: [&[u64]; 5] = [
            &[],
            &[7],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[3, 13, 23, 33, 43, 53],
            &[2, 3, 9, 10, 11, 40, 41, 90, 200, 201, 202, 203, 500],
        ];
        for ids in shapes {
            let entries: Vec<(u64, ())> = ids.iter().map(|&id| (id, ())).collect();
            let top = ids.last().copied().unwrap_or(0) + 3;
            for from in 0..entries.len().max(1) {
                for id in 0..top {
                    assert_eq!(
                        gallop(&entries, from, id),
                        entries.binary_search_by_key(&id, |e| e.0),
                        "ids {ids:?}, from {from}, id {id}"
                    );
                }
            }
        }
    }

    #[test]
    fn appends_fill_whole_chunks_and_out_of_order_ids_split_them() {
        let mut map = ById::new();
        for id in (0..(10 * Chunk::<u64>::CAP as u64)).map(|i| i * 2) {
            map.insert(id, id);
        }
        assert_eq!(map.chunks.len(), 10, "appends fill chunks to the brim");
        assert!(map
            .chunks
            .iter()
            .all(|c| c.entries.len() == Chunk::<u64>::CAP));
        map.insert(7, 1);
        assert_eq!(map.chunks.len(), 11, "an id inside a full chunk splits it");
        assert_eq!(map.get(&7), Some(&1));
        // Consuming from the front drops whole chunks.
        for id in (0..(4 * Chunk::<u64>::CAP as u64)).map(|i| i * 2) {
            map.remove(&id);
        }
        assert!(map.chunks.len() <= 8, "{} chunks", map.chunks.len());
        let ids: Vec<u64> = map.iter().map(|(&id, _)| id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids.len(), map.len());
    }
}

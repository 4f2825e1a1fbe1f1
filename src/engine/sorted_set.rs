//! [`SortedSet`]: an ordered set of small `Copy` keys (ids, `(time, id)` pairs), the indexes of
//! each engine queue (ready, delayed, in flight, rewind area, live).
//!
//! Each of a queue's messages has an entry in two of these sets, and a queue may hold hundreds
//! of millions of messages, so their memory per entry matters. A `BTreeSet` keeps 11 keys per
//! node and leaves nodes about half full when keys arrive in ascending order (nearly always
//! here: ids and times grow): measured about 20 bytes per `u64` and 37 per `(u64, u64)`. This set
//! keeps its keys in a deque of chunks, each a sorted vector of at most [`CHUNK_BYTES`]:
//!
//! - a key above every other (the common case) goes at the end of the last chunk, or starts a
//!   new one when that is full, so chunks filled that way are full (8 and 16 bytes per key, plus
//!   the chunk's 32-byte header per 256 or 128 keys);
//! - any other key goes into the chunk whose range holds it, which is split in two when full;
//! - a removal shifts at most the shorter side of one chunk; a chunk left a quarter full or less is merged into a
//!   neighbour when they fit in one, so no pattern of removals leaves a chunk per key;
//! - taking the first key (receives, expiries) moves nothing: chunks are rings.
//!
//! Lookups are a binary search over the chunks' first keys, then within one chunk. Moving whole
//! chunks in the deque (a split or a merge in the middle) costs one pointer-sized move per
//! chunk on the shorter side: about 40,000 chunks at ten million keys.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

/// Bytes of one chunk's keys at most: a size class of the allocator, small enough that shifting
/// a chunk's keys on an insert or removal in the middle stays cheap.
#[cfg(not(test))]
const CHUNK_BYTES: usize = 2048;

/// Keys per chunk at most: as many as fit in [`CHUNK_BYTES`] (4 in tests, so that splits and
/// merges happen).
#[cfg(not(test))]
const fn chunk_keys(key_bytes: usize) -> usize {
    crate::engine::by_id::entries_fitting(CHUNK_BYTES, key_bytes)
}

#[cfg(test)]
const fn chunk_keys(_key_bytes: usize) -> usize {
    4
}

/// A chunk: a ring, so that taking keys from its front (receives, expiries, deletes of the
/// oldest) moves nothing, and an insert or removal shifts the shorter side.
type Chunk<K> = VecDeque<K>;

/// An ordered set. See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct SortedSet<K> {
    /// Every chunk non-empty and sorted; every key of a chunk is below every key of the next.
    chunks: VecDeque<Chunk<K>>,
    /// Each chunk's first key, side by side: finding a chunk searches these without touching
    /// the chunks' allocations.
    heads: VecDeque<K>,
    len: usize,
}

impl<K> Default for SortedSet<K> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            heads: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy> SortedSet<K> {
    /// Keys per chunk at most.
    const CAP: usize = chunk_keys(std::mem::size_of::<K>());

    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every key (and gives back the memory).
    pub fn clear(&mut self) {
        self.chunks = VecDeque::new();
        self.heads = VecDeque::new();
        self.len = 0;
    }

    /// The smallest key.
    pub fn first(&self) -> Option<&K> {
        self.heads.front()
    }

    /// Removes and returns the smallest key.
    pub fn pop_first(&mut self) -> Option<K> {
        let chunk = self.chunks.front_mut()?;
        let key = chunk.pop_front()?;
        self.len -= 1;
        self.refresh_head(0);
        self.settle(0);
        Some(key)
    }

    /// After chunk `i`'s front changed: its head follows (an empty chunk's is left to
    /// [`SortedSet::settle`], which drops both).
    fn refresh_head(&mut self, i: usize) {
        if let (Some(front), Some(head)) = (
            self.chunks.get(i).and_then(|c| c.front()),
            self.heads.get_mut(i),
        ) {
            *head = *front;
        }
    }

    /// The chunk that holds `key` if any does: the last whose first key is at most `key` (the
    /// first chunk for a key below every other). `None` when empty.
    fn chunk_for(&self, key: &K) -> Option<usize> {
        let chunks = self.heads.len();
        // Most keys looked up are the oldest (receives, deletes, expiries) or the newest.
        match (self.heads.get(1), self.heads.back()) {
            (_, None) => None,
            (None, Some(_)) => Some(0),
            (Some(second), _) if key < second => Some(0),
            (_, Some(last)) if key >= last => Some(chunks - 1),
            _ => Some(
                self.heads
                    .partition_point(|first| first <= key)
                    .saturating_sub(1),
            ),
        }
    }

    /// Whether `key` is held.
    #[cfg(test)]
    pub fn contains(&self, key: &K) -> bool {
        self.chunk_for(key)
            .and_then(|i| self.chunks.get(i))
            .is_some_and(|chunk| chunk.binary_search(key).is_ok())
    }

    /// Adds `key`; false if it was already held.
    pub fn insert(&mut self, key: K) -> bool {
        // Above every key (nearly every insert): at the end of the last chunk, or a new one.
        match self.chunks.back_mut() {
            None => {
                self.push_chunk(key);
                return true;
            }
            Some(last) => match last.back() {
                Some(top) if *top < key => {
                    if last.len() < Self::CAP {
                        last.push_back(key);
                        self.len += 1;
                    } else {
                        self.push_chunk(key);
                    }
                    return true;
                }
                _ => {}
            },
        }
        let Some(i) = self.chunk_for(&key) else {
            self.push_chunk(key);
            return true;
        };
        let Some(chunk) = self.chunks.get_mut(i) else {
            return false;
        };
        let Err(at) = chunk.binary_search(&key) else {
            return false;
        };
        if chunk.len() < Self::CAP {
            chunk.insert(at, key);
        } else {
            // Full: split in two halves, then insert into the half that takes the key.
            let mut upper = VecDeque::with_capacity(Self::CAP);
            upper.extend(chunk.range(Self::CAP / 2..).copied());
            chunk.truncate(Self::CAP / 2);
            if at <= Self::CAP / 2 {
                chunk.insert(at, key);
            } else {
                upper.insert(at - Self::CAP / 2, key);
            }
            if let Some(&upper_first) = upper.front() {
                self.chunks.insert(i + 1, upper);
                self.heads.insert(i + 1, upper_first);
            }
        }
        if at == 0 {
            self.refresh_head(i);
        }
        self.len += 1;
        true
    }

    fn push_chunk(&mut self, key: K) {
        let mut chunk = VecDeque::with_capacity(Self::CAP);
        chunk.push_back(key);
        self.chunks.push_back(chunk);
        self.heads.push_back(key);
        self.len += 1;
    }

    /// Removes `key`; false if it was not held.
    pub fn remove(&mut self, key: &K) -> bool {
        let Some(i) = self.chunk_for(key) else {
            return false;
        };
        let Some(chunk) = self.chunks.get_mut(i) else {
            return false;
        };
        let Ok(at) = chunk.binary_search(key) else {
            return false;
        };
        chunk.remove(at);
        self.len -= 1;
        if at == 0 {
            self.refresh_head(i);
        }
        self.settle(i);
        true
    }

    /// After a removal from chunk `i`: drops it if empty; merges it into a neighbour when it
    /// is a quarter full or less and the two fit in one chunk.
    fn settle(&mut self, i: usize) {
        let Some(len) = self.chunks.get(i).map(VecDeque::len) else {
            return;
        };
        if len == 0 {
            self.chunks.remove(i);
            self.heads.remove(i);
            return;
        }
        if len > Self::CAP / 4 {
            return;
        }
        let fits = |other: Option<&Chunk<K>>| other.is_some_and(|o| o.len() + len <= Self::CAP);
        if fits(self.chunks.get(i + 1)) {
            if let Some(next) = self.chunks.remove(i + 1) {
                self.heads.remove(i + 1);
                if let Some(chunk) = self.chunks.get_mut(i) {
                    chunk.extend(next);
                }
            }
        } else if i > 0 && fits(self.chunks.get(i - 1)) {
            if let Some(chunk) = self.chunks.remove(i) {
                self.heads.remove(i);
                if let Some(prev) = self.chunks.get_mut(i - 1) {
                    prev.extend(chunk);
                }
            }
        }
    }

    /// Every key, in order.
    pub fn iter(&self) -> impl Iterator<Item = &K> + '_ {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// The keys within `range`, in order.
    pub fn range<R: RangeBounds<K>>(&self, range: R) -> impl Iterator<Item = &K> + '_ {
        // The first chunk and position at or past the start bound.
        let (first_chunk, first_at) = match range.start_bound() {
            Bound::Unbounded => (0, 0),
            Bound::Included(start) | Bound::Excluded(start) => {
                let i = self.chunk_for(start).unwrap_or(0);
                let at = self
                    .chunks
                    .get(i)
                    .map_or(0, |chunk| match range.start_bound() {
                        Bound::Excluded(_) => chunk.partition_point(|k| k <= start),
                        _ => chunk.partition_point(|k| k < start),
                    });
                (i, at)
            }
        };
        let end = match range.end_bound() {
            Bound::Included(k) => Bound::Included(*k),
            Bound::Excluded(k) => Bound::Excluded(*k),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.chunks
            .range(first_chunk.min(self.chunks.len())..)
            .enumerate()
            .flat_map(move |(n, chunk)| {
                let from = if n == 0 { first_at.min(chunk.len()) } else { 0 };
                chunk.range(from..)
            })
            .take_while(move |k| match end {
                Bound::Included(e) => **k <= e,
                Bound::Excluded(e) => **k < e,
                Bound::Unbounded => true,
            })
    }

    /// Bytes of heap the set holds: the chunks' allocations (spare room included) and the deque.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk<K>>()
            + self.heads.capacity() * std::mem::size_of::<K>()
            + self
                .chunks
                .iter()
                .map(|chunk| chunk.capacity() * std::mem::size_of::<K>())
                .sum::<usize>()
    }
}

impl<K: Ord + Copy> FromIterator<K> for SortedSet<K> {
    /// Sorts and deduplicates, then fills whole chunks.
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> Self {
        let mut keys: Vec<K> = iter.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let len = keys.len();
        let chunks: VecDeque<Chunk<K>> = keys
            .chunks(Self::CAP)
            .map(|part| {
                let mut chunk = VecDeque::with_capacity(Self::CAP);
                chunk.extend(part.iter().copied());
                chunk
            })
            .collect();
        let heads = keys
            .chunks(Self::CAP)
            .filter_map(|p| p.first().copied())
            .collect();
        Self { chunks, heads, len }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
        PopFirst,
        Range(u16, u16, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u16>().prop_map(|k| Op::Insert(k % 512)),
            2 => any::<u16>().prop_map(|k| Op::Remove(k % 512)),
            1 => Just(Op::PopFirst),
            1 => (any::<u16>(), any::<u16>(), any::<u8>())
                .prop_map(|(a, b, kind)| Op::Range(a % 520, b % 520, kind % 4)),
        ]
    }

    fn check(set: &SortedSet<u16>, model: &BTreeSet<u16>) {
        assert_eq!(set.len(), model.len());
        assert_eq!(set.is_empty(), model.is_empty());
        assert_eq!(set.first(), model.first());
        let ours: Vec<u16> = set.iter().copied().collect();
        let theirs: Vec<u16> = model.iter().copied().collect();
        assert_eq!(ours, theirs);
        // The structure: non-empty chunks, at most CAP keys, in order across chunks.
        let cap = SortedSet::<u16>::CAP;
        assert!(set.chunks.iter().all(|c| !c.is_empty() && c.len() <= cap));
        let heads: Vec<u16> = set
            .chunks
            .iter()
            .filter_map(|c| c.front().copied())
            .collect();
        assert_eq!(set.heads.iter().copied().collect::<Vec<_>>(), heads);
        assert!(ours.windows(2).all(|w| w[0] < w[1]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn behaves_as_a_btreeset(ops in proptest::collection::vec(op(), 0..400)) {
            let mut set = SortedSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(k) => prop_assert_eq!(set.insert(k), model.insert(k)),
                    Op::Remove(k) => prop_assert_eq!(set.remove(&k), model.remove(&k)),
                    Op::PopFirst => prop_assert_eq!(set.pop_first(), model.pop_first()),
                    Op::Range(a, b, kind) => {
                        let (lo, hi) = (a.min(b), a.max(b));
                        let (ours, theirs): (Vec<u16>, Vec<u16>) = match kind {
                            0 => (set.range(lo..hi).copied().collect(),
                                  model.range(lo..hi).copied().collect()),
                            1 => (set.range(lo..=hi).copied().collect(),
                                  model.range(lo..=hi).copied().collect()),
                            2 => (set.range((Bound::Excluded(lo), Bound::Unbounded)).copied().collect(),
                                  model.range((Bound::Excluded(lo), Bound::Unbounded)).copied().collect()),
                            _ => (set.range(..hi).copied().collect(),
                                  model.range(..hi).copied().collect()),
                        };
                        prop_assert_eq!(ours, theirs);
                    }
                }
                for k in [0u16, 1, 255, 511] {
                    prop_assert_eq!(set.contains(&k), model.contains(&k));
                }
            }
            check(&set, &model);
            let rebuilt: SortedSet<u16> = model.iter().rev().copied().collect();
            check(&rebuilt, &model);
        }
    }

    #[test]
    fn ascending_inserts_fill_whole_chunks_and_removals_merge_sparse_ones() {
        let mut set = SortedSet::new();
        for k in 0u64..400 {
            assert!(set.insert(k));
        }
        let cap = SortedSet::<u64>::CAP;
        assert_eq!(set.chunks.len(), 400 / cap);
        assert!(set.chunks.iter().all(|c| c.len() == cap));
        // Leave one key in eight: no chunk is left holding a single key.
        for k in 0u64..400 {
            if k % 8 != 0 {
                assert!(set.remove(&k));
            }
        }
        assert_eq!(set.len(), 50);
        assert!(
            set.chunks.len() <= 50 / (cap / 2) + 1,
            "{} chunks",
            set.chunks.len()
        );
        assert!(set.heap_bytes() > 0);
        set.clear();
        assert_eq!((set.len(), set.heap_bytes()), (0, 0));
    }
}

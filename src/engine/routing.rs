//! Which subscriptions a published message goes to: the tag index (filterType 1) and the
//! binding-key trie (filterType 2).
//!
//! Both answer in time that grows with the message (its tags, its routing key's words) and with
//! the number of subscriptions that match, never with the number of subscriptions a topic has:
//! a topic with 10,000 subscriptions routes a message that matches two of them about as fast as
//! one with ten.
//!
//! # Tags ([`TagIndex`])
//!
//! CMQ's rules (`CMQ.md` A.7): a subscription without filterTag receives every message; a
//! subscription with filterTags receives a message when the two tag sets intersect, so it never
//! receives an untagged message. The index maps each tag to the subscriptions that name it and
//! keeps the untagged subscriptions in a list of their own.
//!
//! # Binding keys ([`BindingTrie`])
//!
//! RabbitMQ's topic rules, which CMQ declares itself compatible with: keys are words separated by
//! `.`; in a binding key the word `*` matches exactly one word and the word `#` matches zero or
//! more words. `*` and `#` are wildcards only as whole words (`a*` is a literal word). The empty
//! key has zero words: it matches only the empty routing key, and `#` matches that too.
//!
//! The trie branches at `*` and `#` as NATS's sublist does at `*` and `>`; unlike NATS's `>`, a
//! `#` may stand anywhere and match zero words, so a match walks a `#` node once for every
//! number of words it may swallow. Consecutive `#` words are folded into one when a key is
//! inserted (`#.#` means what `#` means), and each `#` node remembers the lowest position it was
//! entered at during one match, so a pathological key such as `#.a.#.a.#` costs at most
//! (trie nodes visited) x (words + 1) steps rather than a combinatorial number.
//!
//! ```
//! use cmqd::engine::routing::BindingTrie;
//!
//! let mut trie = BindingTrie::new();
//! trie.insert("1.*.0", 1u64);
//! trie.insert("1.#.0", 2);
//! trie.insert("#", 3);
//! let mut hits = Vec::new();
//! trie.matches("1.x.0", &mut hits);
//! assert_eq!(hits, [1, 2, 3]);
//! hits.clear();
//! trie.matches("1.0", &mut hits); // `#` matched zero words
//! assert_eq!(hits, [2, 3]);
//! ```

use std::collections::HashMap;

/// The most words a routing key or binding key may have (CMQ: at most 15 `.`).
const WORDS_MAX: usize = crate::limits::ROUTING_KEY_DOTS_MAX + 1;

/// Subscription ids by the tags they filter on; see the module documentation.
///
/// ```
/// use cmqd::engine::routing::TagIndex;
///
/// let mut index = TagIndex::new();
/// index.insert(&["apple".to_string()], 1u64);
/// index.insert(&["xiaomi".to_string()], 2);
/// index.insert(&["imac".to_string(), "xiaomi".to_string()], 3);
/// index.insert(&[], 4); // no filterTag: receives everything
/// let mut hits = Vec::new();
/// index.matches(&["apple", "imac", "iphone", "macbook"], &mut hits);
/// assert_eq!(hits, [1, 3, 4]);
/// hits.clear();
/// index.matches(&[], &mut hits); // an untagged message reaches untagged subscriptions only
/// assert_eq!(hits, [4]);
/// ```
#[derive(Debug, Clone)]
pub struct TagIndex<T> {
    by_tag: HashMap<Box<str>, Vec<T>>,
    untagged: Vec<T>,
}

impl<T> Default for TagIndex<T> {
    fn default() -> Self {
        Self {
            by_tag: HashMap::new(),
            untagged: Vec::new(),
        }
    }
}

impl<T: Copy + Eq + Ord> TagIndex<T> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subscription with these filter tags (none: it receives every message).
    pub fn insert(&mut self, tags: &[String], value: T) {
        if tags.is_empty() {
            self.untagged.push(value);
            return;
        }
        for tag in distinct(tags) {
            self.by_tag
                .entry(Box::from(tag.as_str()))
                .or_default()
                .push(value);
        }
    }

    /// Removes what [`TagIndex::insert`] added for the same tags and value.
    pub fn remove(&mut self, tags: &[String], value: T) {
        if tags.is_empty() {
            remove_one(&mut self.untagged, value);
            return;
        }
        for tag in distinct(tags) {
            if let Some(list) = self.by_tag.get_mut(tag.as_str()) {
                remove_one(list, value);
                if list.is_empty() {
                    self.by_tag.remove(tag.as_str());
                }
            }
        }
    }

    /// Appends the subscriptions that receive a message with these tags to `out`, each once, in
    /// ascending order (sorts and dedups what `out` already held too).
    pub fn matches(&self, msg_tags: &[&str], out: &mut Vec<T>) {
        out.extend_from_slice(&self.untagged);
        for tag in msg_tags {
            if let Some(list) = self.by_tag.get(*tag) {
                out.extend_from_slice(list);
            }
        }
        out.sort_unstable();
        out.dedup();
    }

    /// Whether no subscription is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_tag.is_empty() && self.untagged.is_empty()
    }
}

/// The tags of a list without repeats, so a subscription that names a tag twice is indexed once.
fn distinct(tags: &[String]) -> impl Iterator<Item = &String> {
    tags.iter()
        .enumerate()
        .filter(|(i, tag)| !tags[..*i].contains(tag))
        .map(|(_, tag)| tag)
}

fn remove_one<T: PartialEq>(list: &mut Vec<T>, value: T) {
    if let Some(at) = list.iter().position(|v| *v == value) {
        list.swap_remove(at);
    }
}

/// Binding keys in a trie that branches at `*` and `#`; see the module documentation.
///
/// The same value may be inserted under several keys (a subscription's five binding keys), and
/// under the same key twice; [`BindingTrie::matches`] reports it once.
///
/// Literal words are interned: the trie keeps one dictionary from word to a small id, and each
/// node keeps its literal children sorted by id. A match hashes each word of the routing key
/// once (at most 16) and then steps from node to node by binary search over a few integers,
/// rather than hashing a string at every node it visits.
#[derive(Debug, Clone)]
pub struct BindingTrie<T> {
    /// Arena of nodes; index 0 is the root. Freed slots are reused.
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    /// Every literal word on some edge: its id and how many edges carry it.
    dictionary: HashMap<Box<str>, Word>,
    /// Ids of words no edge carries any more, for reuse.
    free_words: Vec<u32>,
    next_word: u32,
}

#[derive(Debug, Clone, Copy)]
struct Word {
    id: u32,
    edges: u32,
}

#[derive(Debug, Clone)]
struct Node<T> {
    /// Children by literal word id, sorted by id.
    words: Vec<(u32, u32)>,
    /// Child through a `*` word.
    star: Option<u32>,
    /// Child through a `#` word.
    hash: Option<u32>,
    /// Values whose key ends here.
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            words: Vec::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
            && self.values.is_empty()
    }

    fn word_child(&self, id: u32) -> Option<u32> {
        self.words
            .binary_search_by_key(&id, |&(word, _)| word)
            .ok()
            .and_then(|at| self.words.get(at))
            .map(|&(_, child)| child)
    }
}

/// One step of a key's path through the trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge<'a> {
    Word(&'a str),
    Star,
    Hash,
}

/// The words of a key; the empty key has none.
fn words(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').filter(move |_| !key.is_empty())
}

/// A binding key's path: `*` and `#` words become wildcard edges and runs of `#` fold into one.
fn edges(key: &str) -> Vec<Edge<'_>> {
    let mut path: Vec<Edge<'_>> = Vec::new();
    for word in words(key) {
        let edge = match word {
            "*" => Edge::Star,
            "#" => Edge::Hash,
            literal => Edge::Word(literal),
        };
        if edge == Edge::Hash && path.last() == Some(&Edge::Hash) {
            continue;
        }
        path.push(edge);
    }
    path
}

impl<T> Default for BindingTrie<T> {
    fn default() -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            dictionary: HashMap::new(),
            free_words: Vec::new(),
            next_word: 0,
        }
    }
}

impl<T: Copy + Eq + Ord> BindingTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no key is bound.
    pub fn is_empty(&self) -> bool {
        self.nodes.first().is_none_or(Node::is_empty)
    }

    /// Binds `value` under `key`.
    pub fn insert(&mut self, key: &str, value: T) {
        let mut at = 0u32;
        for edge in edges(key) {
            if let Some(next) = self.child(at, edge) {
                at = next;
                continue;
            }
            let next = self.allocate();
            let word = match edge {
                Edge::Word(word) => Some(self.intern(word)),
                Edge::Star | Edge::Hash => None,
            };
            if let Some(node) = self.nodes.get_mut(at as usize) {
                match (edge, word) {
                    (Edge::Word(_), Some(id)) => {
                        let slot = node.words.partition_point(|&(w, _)| w < id);
                        node.words.insert(slot, (id, next));
                    }
                    (Edge::Star, _) => node.star = Some(next),
                    _ => node.hash = Some(next),
                }
            }
            at = next;
        }
        if let Some(node) = self.nodes.get_mut(at as usize) {
            node.values.push(value);
        }
    }

    /// Unbinds one `value` bound under `key` (nothing if there is none), and drops the nodes
    /// and words that no longer lead anywhere.
    pub fn remove(&mut self, key: &str, value: T) {
        let mut path: Vec<(u32, Edge<'_>)> = Vec::new();
        let mut at = 0u32;
        for edge in edges(key) {
            let Some(next) = self.child(at, edge) else {
                return;
            };
            path.push((at, edge));
            at = next;
        }
        let Some(node) = self.nodes.get_mut(at as usize) else {
            return;
        };
        remove_one(&mut node.values, value);
        // Prune from the end of the path back towards the root (which always stays).
        while let Some((parent, edge)) = path.pop() {
            if !self.nodes.get(at as usize).is_some_and(Node::is_empty) {
                break;
            }
            let word = match edge {
                Edge::Word(word) => self.dictionary.get(word).map(|w| w.id),
                Edge::Star | Edge::Hash => None,
            };
            if let Some(node) = self.nodes.get_mut(parent as usize) {
                match (edge, word) {
                    (Edge::Word(_), Some(id)) => node.words.retain(|&(w, _)| w != id),
                    (Edge::Star, _) => node.star = None,
                    (Edge::Hash, _) => node.hash = None,
                    (Edge::Word(_), None) => {}
                }
            }
            if let Edge::Word(word) = edge {
                self.release(word);
            }
            self.free.push(at);
            at = parent;
        }
    }

    /// Appends every value bound under a key that `routing_key` matches to `out`, each once, in
    /// ascending order (sorts and dedups what `out` already held too). A routing key of more
    /// than 16 words matches nothing: none can be bound.
    pub fn matches(&self, routing_key: &str, out: &mut Vec<T>) {
        // Each word as the id of the same literal in the trie, if any edge carries it.
        let mut ids: [Option<u32>; WORDS_MAX] = [None; WORDS_MAX];
        let mut count = 0usize;
        for word in words(routing_key) {
            let Some(slot) = ids.get_mut(count) else {
                return;
            };
            *slot = self.dictionary.get(word).map(|w| w.id);
            count += 1;
        }
        let mut walk = Walk {
            trie: self,
            words: ids.get(..count).unwrap_or_default(),
            out,
            hash_entries: Vec::new(),
        };
        walk.node(0, 0);
        out.sort_unstable();
        out.dedup();
    }

    fn child(&self, at: u32, edge: Edge<'_>) -> Option<u32> {
        let node = self.nodes.get(at as usize)?;
        match edge {
            Edge::Word(word) => node.word_child(self.dictionary.get(word)?.id),
            Edge::Star => node.star,
            Edge::Hash => node.hash,
        }
    }

    /// The id of `word`, counting one more edge that carries it.
    fn intern(&mut self, word: &str) -> u32 {
        if let Some(entry) = self.dictionary.get_mut(word) {
            entry.edges += 1;
            return entry.id;
        }
        let id = self.free_words.pop().unwrap_or_else(|| {
            let id = self.next_word;
            self.next_word = self.next_word.saturating_add(1);
            id
        });
        self.dictionary
            .insert(Box::from(word), Word { id, edges: 1 });
        id
    }

    /// One edge fewer carries `word`; the last one frees its id.
    fn release(&mut self, word: &str) {
        if let Some(entry) = self.dictionary.get_mut(word) {
            entry.edges = entry.edges.saturating_sub(1);
            if entry.edges == 0 {
                self.free_words.push(entry.id);
                self.dictionary.remove(word);
            }
        }
    }

    fn allocate(&mut self) -> u32 {
        if let Some(slot) = self.free.pop() {
            if let Some(node) = self.nodes.get_mut(slot as usize) {
                *node = Node::default();
            }
            return slot;
        }
        self.nodes.push(Node::default());
        // A topic holds at most 1,000 subscriptions x 5 keys x 16 words by default; u32 is ample.
        u32::try_from(self.nodes.len() - 1).unwrap_or(u32::MAX)
    }
}

/// The state of one match.
struct Walk<'t, 'w, 'o, T> {
    trie: &'t BindingTrie<T>,
    /// The routing key's words as word ids (`None`: no edge carries that word).
    words: &'w [Option<u32>],
    out: &'o mut Vec<T>,
    /// (`#` node, lowest position it was entered at): see the module documentation.
    hash_entries: Vec<(u32, usize)>,
}

impl<T: Copy> Walk<'_, '_, '_, T> {
    /// Matches the words from `position` on against the keys below `at`. Recursion depth is
    /// bounded by the trie's depth (at most 16 edges per key), not by the input.
    fn node(&mut self, at: u32, position: usize) {
        let Some(node) = self.trie.nodes.get(at as usize) else {
            return;
        };
        match self.words.get(position) {
            None => self.out.extend_from_slice(&node.values),
            Some(word) => {
                if let Some(next) = word.and_then(|id| node.word_child(id)) {
                    self.node(next, position + 1);
                }
                if let Some(next) = node.star {
                    self.node(next, position + 1);
                }
            }
        }
        if let Some(next) = node.hash {
            self.hash(next, position);
        }
    }

    /// Entering the `#` node `at` at `position`: it may swallow any number of the remaining
    /// words. Positions already tried from an earlier entry are not tried again.
    fn hash(&mut self, at: u32, position: usize) {
        let end = self.words.len();
        let upto = match self.hash_entries.iter_mut().find(|(node, _)| *node == at) {
            Some((_, lowest)) if *lowest <= position => return,
            Some((_, lowest)) => {
                let previous = *lowest;
                *lowest = position;
                previous
            }
            None => {
                self.hash_entries.push((at, position));
                end + 1
            }
        };
        for next in position..upto {
            self.node(at, next);
        }
    }
}

/// Checks a routing key or binding key against CMQ's limits. Returns the number of `.` it has,
/// or `None` when it breaks a rule other than the count of dots: over `bytes_max` bytes, or an
/// empty word in a non-empty key (`a..b`, `.a`, `a.`).
pub fn key_shape(key: &str, bytes_max: usize) -> Option<usize> {
    if key.len() > bytes_max {
        return None;
    }
    if !key.is_empty() && key.split('.').any(str::is_empty) {
        return None;
    }
    Some(key.bytes().filter(|&b| b == b'.').count())
}

/// The reference matcher the trie is tested against: RabbitMQ's rules, written as directly as
/// they read (exponential on `#`, fine for short test keys).
#[cfg(test)]
fn reference_matches(binding: &[&str], routing: &[&str]) -> bool {
    match (binding.split_first(), routing.split_first()) {
        (None, None) => true,
        (Some((&"#", rest)), _) => {
            reference_matches(rest, routing)
                || routing
                    .split_first()
                    .is_some_and(|(_, tail)| reference_matches(binding, tail))
        }
        (Some((&"*", rest)), Some((_, tail))) => reference_matches(rest, tail),
        (Some((word, rest)), Some((first, tail))) if word == first => reference_matches(rest, tail),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hits<T: Copy + Ord + Eq>(trie: &BindingTrie<T>, key: &str) -> Vec<T> {
        let mut out = Vec::new();
        trie.matches(key, &mut out);
        out
    }

    /// RabbitMQ's topic routing suite (CMQ.md A.7, [R2]): bindings t1-t26, and for each routing
    /// key the queues that must receive it.
    #[test]
    fn rabbitmq_conformance_vectors() {
        let bindings: [(u32, &str); 26] = [
            (1, "a.b.c"),
            (2, "a.*.c"),
            (3, "a.#.b"),
            (4, "a.b.b.c"),
            (5, "#"),
            (6, "#.#"),
            (7, "#.b"),
            (8, "*.*"),
            (9, "a.*"),
            (10, "*.b.c"),
            (11, "a.#"),
            (12, "a.#.#"),
            (13, "b.b.c"),
            (14, "a.b.b"),
            (15, "a.b"),
            (16, "b.c"),
            (17, ""),
            (18, "*.*.*"),
            (19, "vodka.martini"),
            (20, "a.b.c"),
            (21, "*.#"),
            (22, "#.*.#"),
            (23, "*.#.#"),
            (24, "#.#.#"),
            (25, "*"),
            (26, "#.b.#"),
        ];
        let expected: [(&str, &[u32]); 10] = [
            (
                "a.b.c",
                &[1, 2, 5, 6, 10, 11, 12, 18, 20, 21, 22, 23, 24, 26],
            ),
            ("a.b", &[3, 5, 6, 7, 8, 9, 11, 12, 15, 21, 22, 23, 24, 26]),
            ("a.b.b", &[3, 5, 6, 7, 11, 12, 14, 18, 21, 22, 23, 24, 26]),
            ("", &[5, 6, 17, 24]),
            ("b.c.c", &[5, 6, 18, 21, 22, 23, 24, 26]),
            ("a.a.a.a.a", &[5, 6, 11, 12, 21, 22, 23, 24]),
            ("vodka.gin", &[5, 6, 8, 21, 22, 23, 24]),
            ("b.b.c", &[5, 6, 10, 13, 18, 21, 22, 23, 24, 26]),
            ("oneword", &[5, 6, 21, 22, 23, 24, 25]),
            ("nothing.here.at.all", &[5, 6, 21, 22, 23, 24]),
        ];
        let mut trie = BindingTrie::new();
        for (queue, key) in bindings {
            trie.insert(key, queue);
        }
        for (routing_key, queues) in expected {
            assert_eq!(
                hits(&trie, routing_key),
                queues,
                "routing key {routing_key:?}"
            );
            // The reference matcher agrees with the suite too.
            let routing: Vec<&str> = words(routing_key).collect();
            let reference: Vec<u32> = bindings
                .iter()
                .filter(|(_, key)| reference_matches(&words(key).collect::<Vec<_>>(), &routing))
                .map(|(queue, _)| *queue)
                .collect();
            assert_eq!(reference, queues, "reference, routing key {routing_key:?}");
        }
        // Unbinding everything leaves an empty trie (pruned back to the root).
        for (queue, key) in bindings {
            trie.remove(key, queue);
        }
        assert!(trie.is_empty());
        assert_eq!(
            trie.nodes.len() - trie.free.len(),
            1,
            "only the root is live"
        );
    }

    /// The examples of CMQ's routing-key page (CMQ.md A.7).
    #[test]
    fn cmq_examples() {
        let mut trie = BindingTrie::new();
        trie.insert("1.*.0", 1u8);
        trie.insert("1.#.0", 2);
        trie.insert("#", 3);
        assert_eq!(hits(&trie, "1.x.0"), [1, 2, 3]);
        assert_eq!(hits(&trie, "1.2.3.4.4.2.2.0"), [2, 3]);
        assert_eq!(hits(&trie, "1.0"), [2, 3]);
        assert_eq!(hits(&trie, "anything.at.all"), [3]);
    }

    #[test]
    fn wildcards_only_as_whole_words() {
        let mut trie = BindingTrie::new();
        trie.insert("a*.b", 1u8);
        trie.insert("a#", 2);
        assert_eq!(hits(&trie, "ax.b"), [] as [u8; 0]);
        assert_eq!(hits(&trie, "a*.b"), [1]);
        assert_eq!(hits(&trie, "a#"), [2]);
        assert_eq!(hits(&trie, "a.b"), [] as [u8; 0]);
    }

    #[test]
    fn a_value_under_several_matching_keys_is_reported_once() {
        let mut trie = BindingTrie::new();
        for key in ["a.*", "a.b", "#", "a.#.#", "a.#"] {
            trie.insert(key, 7u64);
        }
        assert_eq!(hits(&trie, "a.b"), [7]);
        // Removing one binding leaves the others in force.
        trie.remove("a.b", 7);
        trie.remove("#", 7);
        assert_eq!(hits(&trie, "a.b"), [7]);
        trie.remove("a.*", 7);
        trie.remove("a.#.#", 7);
        assert_eq!(
            hits(&trie, "a.b"),
            [7],
            "a.# and a.#.# fold to the same node"
        );
        trie.remove("a.#", 7);
        assert!(hits(&trie, "a.b").is_empty());
        assert!(trie.is_empty());
    }

    #[test]
    fn too_many_words_match_nothing() {
        let mut trie = BindingTrie::new();
        trie.insert("#", 1u8);
        let sixteen = vec!["w"; 16].join(".");
        let seventeen = vec!["w"; 17].join(".");
        assert_eq!(hits(&trie, &sixteen), [1]);
        assert!(hits(&trie, &seventeen).is_empty());
    }

    /// Alternating `#` and literals would explore every way to split the words between the
    /// `#`s without the per-node memo; with it the match stays fast.
    #[test]
    fn pathological_hashes_stay_cheap() {
        let mut trie = BindingTrie::new();
        trie.insert("#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.b", 1u8);
        let key = vec!["a"; 16].join(".");
        let started = crate::clock::monotonic_now();
        for _ in 0..100 {
            assert!(hits(&trie, &key).is_empty());
        }
        // Generous: the memo makes this microseconds; without it, seconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn key_shape_rules() {
        assert_eq!(key_shape("", 64), Some(0));
        assert_eq!(key_shape("a.b.c", 64), Some(2));
        assert_eq!(key_shape("a..b", 64), None);
        assert_eq!(key_shape(".a", 64), None);
        assert_eq!(key_shape("a.", 64), None);
        assert_eq!(key_shape(&"x".repeat(65), 64), None);
        assert_eq!(key_shape(&"x".repeat(64), 64), Some(0));
    }

    #[test]
    fn tag_index_follows_cmq_rules() {
        let mut index = TagIndex::new();
        let tags = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        index.insert(&tags(&["apple"]), 1u32);
        index.insert(&tags(&["xiaomi"]), 2);
        index.insert(&tags(&["imac", "xiaomi"]), 3);
        index.insert(&[], 4);
        index.insert(&tags(&["apple", "apple"]), 5);
        fn matched(index: &TagIndex<u32>, msg: &[&str]) -> Vec<u32> {
            let mut out = Vec::new();
            index.matches(msg, &mut out);
            out
        }
        assert_eq!(
            matched(&index, &["apple", "imac", "iphone", "macbook"]),
            [1, 3, 4, 5]
        );
        assert_eq!(matched(&index, &[]), [4]);
        assert_eq!(
            matched(&index, &["Apple"]),
            [4],
            "tags compare as exact strings"
        );
        index.remove(&tags(&["apple", "apple"]), 5);
        index.remove(&tags(&["imac", "xiaomi"]), 3);
        assert_eq!(matched(&index, &["apple", "imac", "xiaomi"]), [1, 2, 4]);
        index.remove(&tags(&["apple"]), 1);
        index.remove(&tags(&["xiaomi"]), 2);
        index.remove(&[], 4);
        assert!(index.is_empty());
    }

    fn word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "c", "*", "#"])
    }

    fn literal() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "c"])
    }

    proptest! {
        /// The trie agrees with the ten-line recursive reference matcher on random bindings
        /// and routing keys (including inserts and removals).
        #[test]
        fn trie_matches_the_reference(
            bindings in prop::collection::vec(prop::collection::vec(word(), 0..6), 1..20),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
            routing_keys in prop::collection::vec(prop::collection::vec(literal(), 0..7), 1..10),
        ) {
            let mut trie = BindingTrie::new();
            let keys: Vec<String> = bindings.iter().map(|words| words.join(".")).collect();
            for (value, key) in keys.iter().enumerate() {
                trie.insert(key, value);
            }
            let mut live: Vec<bool> = vec![true; keys.len()];
            for index in removed {
                let value = index.index(keys.len());
                if live[value] {
                    trie.remove(&keys[value], value);
                    live[value] = false;
                }
            }
            for routing in routing_keys {
                let expected: Vec<usize> = bindings
                    .iter()
                    .enumerate()
                    .filter(|(value, binding)| live[*value] && reference_matches(binding, &routing))
                    .map(|(value, _)| value)
                    .collect();
                prop_assert_eq!(hits(&trie, &routing.join(".")), expected, "routing {:?}", routing);
            }
        }
    }
}

//! The page-state index: one bit per folio, set while the folio is present.
//!
//! guest_memfd offers no SEEK_DATA and no way to ask which pages exist, so the
//! crate records every folio it allocates. The fault path asks "is folio `i`
//! present?" millions of times a second, so the question is one or a few
//! dependent atomic loads with no lock.
//!
//! Model: a radix tree of bitmaps, as the kernel's xarray is for the page
//! cache. A leaf holds 512 bits (one cache line, 2 MiB of 4 KiB pages); an
//! interior node holds 64 child pointers. A file of at most 512 folios has a
//! leaf as its root, sized to the file (one word for a 256 KiB file), so
//! 100,000 small files cost almost nothing. Larger files grow interior nodes
//! and leaves lazily, when a bit is first set below them: a file of 2^62 bytes
//! costs nothing until it is used, as in the kernel.
//!
//! Invariant: a node, once published in a parent slot, stays there until the
//! index is dropped (punching a hole clears bits, never frees nodes). A reader
//! holding `&self` therefore never sees a freed node, with no epoch or RCU.
//!
//! Ordering: bits are set with Release and read with Acquire, so a thread
//! that sees a folio present also sees what its allocator did before setting
//! the bit. Child pointers are published with a Release compare-exchange and
//! read with Acquire (pairs with that exchange), so a reader that finds a node
//! finds it initialised.
//!
//! Punch hole (`clear_run`) is ordered with every concurrent `insert` below
//! its range by read-modify-writes on common locations: it applies one to
//! every word of the range in an existing leaf, present bits or not, and a
//! compare-exchange of null with null to every null child slot over it;
//! `insert` sets its bit, and installs missing nodes, with acquire-release
//! read-modify-writes. Of two read-modify-writes of one location one reads
//! the other's result, so either the insert comes first (and the punch
//! clears its bit) or the punch does (and the inserter sees everything the
//! punch did before `clear_run`). The fault path in `state` builds on this
//! instead of a lock.
//!
//! Runs: the preservation layer describes a file by its runs of present
//! folios and a successor rebuilds the index from them, both inside a live
//! update's blackout, so both work a word (64 folios) at a time: a run walk
//! ([`PageStateIndex::runs`]) skips empty words and never-used subtrees and
//! takes full words whole; a run insert sets whole words. A fully populated
//! 8 GiB file of 4 KiB folios is 32,768 words, not 2 million folios.
//!
//! Generation: a counter bumped by every insert or remove that changes the
//! set (once per call for a run), so a caller that described the index can
//! later ask whether it changed since, without walking it again. It is read
//! with Acquire and bumped with Release after the bits changed: a reader
//! that sees the new generation sees the change. It answers exactly while
//! no change can be in flight (the file is frozen: `freeze` waits for every
//! allocation and punch to end); a change racing the read shows in a later
//! read.

use std::ops::Range;

use crate::sync::{AtomicPtr, AtomicU64, Ordering};

/// Bits per leaf: 8 words, one 64-byte cache line.
const LEAF_WORDS: usize = 8;
const LEAF_BITS_SHIFT: u32 = 9;
const LEAF_BITS: u64 = 1 << LEAF_BITS_SHIFT;
/// Children per interior node: 64 pointers, 512 bytes.
const FANOUT_SHIFT: u32 = 6;
const FANOUT: usize = 1 << FANOUT_SHIFT;

struct Leaf {
    words: [AtomicU64; LEAF_WORDS],
}

struct Interior {
    /// Each child is a `Leaf` when this node is at height 1, else an
    /// `Interior`; null when nothing below it was ever set.
    children: [AtomicPtr<()>; FANOUT],
}

enum Root {
    /// Files of at most 512 folios: the bits themselves, sized to the file.
    Flat(Box<[AtomicU64]>),
    /// Larger files: a tree of the given height (>= 1) over leaves.
    Tree { height: u32, node: Box<Interior> },
}

/// One presence bit per folio of a file; see the module documentation.
pub(crate) struct PageStateIndex {
    folios: u64,
    root: Root,
    /// Bumped by every change of the set; see the module documentation.
    generation: AtomicU64,
}

fn new_leaf() -> Box<Leaf> {
    Box::new(Leaf {
        words: std::array::from_fn(|_| AtomicU64::new(0)),
    })
}

fn new_interior() -> Box<Interior> {
    Box::new(Interior {
        children: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
    })
}

/// The bit of `folio` within a bitmap of words.
fn word_and_mask(folio: u64) -> (usize, u64) {
    ((folio / 64) as usize, 1u64 << (folio % 64))
}

/// The bits of folios `first..end` (relative to one word's first folio,
/// `first < end <= 64`) within that word.
fn bits_between(first: u64, end: u64) -> u64 {
    let below_end = if end >= 64 {
        u64::MAX
    } else {
        (1u64 << end) - 1
    };
    below_end & (u64::MAX << first)
}

impl PageStateIndex {
    /// An empty index for a file of `folios` folios.
    pub(crate) fn new(folios: u64) -> PageStateIndex {
        let root = if folios <= LEAF_BITS {
            let words = folios.div_ceil(64) as usize;
            Root::Flat((0..words).map(|_| AtomicU64::new(0)).collect())
        } else {
            // A file has at most 2^51 folios (i64::MAX bytes of 4 KiB pages),
            // which height 7 covers; the bound keeps the shift in range.
            let mut height = 1;
            while height < 8 && (LEAF_BITS << (FANOUT_SHIFT * height)) < folios {
                height += 1;
            }
            Root::Tree {
                height,
                node: new_interior(),
            }
        };
        PageStateIndex {
            folios,
            root,
            generation: AtomicU64::new(0),
        }
    }

    /// How many times the set of present folios changed (see the module
    /// documentation).
    pub(crate) fn generation(&self) -> u64 {
        // Acquire pairs with the Release bump in `changed`: a caller that
        // sees a generation sees the bits of every change it counts.
        self.generation.load(Ordering::Acquire)
    }

    /// Counts one change of the set, after its bits changed.
    fn changed(&self) {
        // Release pairs with the Acquire in `generation`.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The leaf words holding `folio`, or `None` where no bit below was ever
    /// set. With `create`, missing nodes are installed on the way down.
    #[inline]
    fn words(&self, folio: u64, create: bool) -> Option<&[AtomicU64]> {
        match &self.root {
            Root::Flat(words) => Some(words),
            Root::Tree { height, node } => {
                let mut node: &Interior = node;
                let mut level = *height;
                loop {
                    let shift = LEAF_BITS_SHIFT + FANOUT_SHIFT * (level - 1);
                    let slot = &node.children[((folio >> shift) as usize) % FANOUT];
                    let child = Self::child(slot, level == 1, create)?;
                    if level == 1 {
                        // SAFETY: at height 1 every child pointer was made by
                        // `Box::into_raw` of a `Leaf` (see `child`), and nodes
                        // are never freed while `self` is borrowed (module
                        // invariant).
                        let leaf = unsafe { &*child.cast::<Leaf>() };
                        return Some(&leaf.words);
                    }
                    // SAFETY: above height 1 every child is an `Interior` made
                    // by `Box::into_raw` and kept until `self` drops.
                    node = unsafe { &*child.cast::<Interior>() };
                    level -= 1;
                }
            }
        }
    }

    /// Loads a child pointer, installing a fresh node when asked to.
    #[inline]
    fn child(slot: &AtomicPtr<()>, leaf: bool, create: bool) -> Option<*mut ()> {
        // Acquire pairs with the Release exchange below: a published node is
        // seen initialised.
        let current = slot.load(Ordering::Acquire);
        if !current.is_null() {
            return Some(current);
        }
        if !create {
            return None;
        }
        let fresh: *mut () = if leaf {
            Box::into_raw(new_leaf()).cast()
        } else {
            Box::into_raw(new_interior()).cast()
        };
        // Release publishes the zeroed node; Acquire on failure pairs with the
        // winner's Release so its node is seen initialised, and on success
        // with a punch's null-for-null exchange of this slot (`clear_run`).
        match slot.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Some(fresh),
            Err(winner) => {
                // SAFETY: `fresh` was made by `Box::into_raw` just above and
                // never published, so this is its only owner.
                unsafe { Self::free_node(fresh, leaf) };
                Some(winner)
            }
        }
    }

    /// Frees a node made by `Box::into_raw`.
    ///
    /// # Safety
    /// `node` must come from `Box::into_raw` of a `Leaf` (when `leaf`) or an
    /// `Interior` (otherwise), and nobody may use it afterwards.
    unsafe fn free_node(node: *mut (), leaf: bool) {
        if leaf {
            // SAFETY: the caller guarantees `node` is an unshared boxed Leaf.
            drop(unsafe { Box::from_raw(node.cast::<Leaf>()) });
        } else {
            // SAFETY: the caller guarantees `node` is an unshared boxed Interior.
            drop(unsafe { Box::from_raw(node.cast::<Interior>()) });
        }
    }

    /// Whether `folio` is present. Lock-free: a few dependent loads.
    #[inline]
    pub(crate) fn contains(&self, folio: u64) -> bool {
        if folio >= self.folios {
            return false;
        }
        let Some(words) = self.words(folio, false) else {
            return false;
        };
        let (word, mask) = word_and_mask(folio % LEAF_BITS);
        // Acquire pairs with the Release `fetch_or` in `insert`.
        words[word].load(Ordering::Acquire) & mask != 0
    }

    /// Marks `folio` present. Returns whether it was absent before.
    pub(crate) fn insert(&self, folio: u64) -> bool {
        if folio >= self.folios {
            return false;
        }
        let Some(words) = self.words(folio, true) else {
            return false;
        };
        let (word, mask) = word_and_mask(folio % LEAF_BITS);
        // Release pairs with the Acquire load in `contains`; Acquire with the
        // AcqRel `fetch_and` of a punch's `clear_run` that came first.
        let inserted = words[word].fetch_or(mask, Ordering::AcqRel) & mask == 0;
        if inserted {
            self.changed();
        }
        inserted
    }

    /// Marks folios `start..start + count` present (clipped to the file), a
    /// word at a time: one read-modify-write per word that lacks a bit.
    /// Returns how many were absent before.
    pub(crate) fn insert_run(&self, start: u64, count: u64) -> u64 {
        let inserted = self.for_each_word_of_run(start, count, |word, mask| {
            // Relaxed pre-check: words already full (the common case when a
            // run is recorded again) are not written at all.
            if word.load(Ordering::Relaxed) & mask == mask {
                return 0;
            }
            // Release pairs with the Acquire load in `contains`.
            let before = word.fetch_or(mask, Ordering::Release);
            u64::from((mask & !before).count_ones())
        });
        if inserted > 0 {
            self.changed();
        }
        inserted
    }

    /// [`PageStateIndex::insert_run`] for an index no other thread can see
    /// yet (a file being restored): `&mut self` proves it, so each word is
    /// a plain load and store instead of a locked read-modify-write. The
    /// index reaches other threads later through a synchronizing
    /// publication (an `Arc` behind a lock), which orders these stores.
    pub(crate) fn insert_run_unpublished(&mut self, start: u64, count: u64) -> u64 {
        let inserted = self.for_each_word_of_run(start, count, |word, mask| {
            // Relaxed: no other thread can access the index (see above).
            let before = word.load(Ordering::Relaxed);
            word.store(before | mask, Ordering::Relaxed);
            u64::from((mask & !before).count_ones())
        });
        if inserted > 0 {
            self.changed();
        }
        inserted
    }

    /// Calls `apply(word, mask)` for every word holding a folio of
    /// `start..start + count` (clipped to the file), with the mask of the
    /// run's bits in it, creating leaves on the way; sums what it returns.
    fn for_each_word_of_run(
        &self,
        start: u64,
        count: u64,
        mut apply: impl FnMut(&AtomicU64, u64) -> u64,
    ) -> u64 {
        let end = start.saturating_add(count).min(self.folios);
        let mut position = start;
        let mut total = 0;
        while position < end {
            let leaf_base = position - position % LEAF_BITS;
            let leaf_end = end.min(leaf_base + LEAF_BITS);
            let Some(words) = self.words(position, true) else {
                return total;
            };
            while position < leaf_end {
                let word_base = position - position % 64;
                let word_end = leaf_end.min(word_base + 64);
                let mask = bits_between(position - word_base, word_end - word_base);
                let Some(word) = words.get(((word_base - leaf_base) / 64) as usize) else {
                    return total;
                };
                total += apply(word, mask);
                position = word_end;
            }
        }
        total
    }

    /// Clears the bits of folios `start..start + count` (clipped to the
    /// file) for a punch hole, a word at a time, and returns every word it
    /// changed with the bits it cleared there (for
    /// [`PageStateIndex::restore_cleared`]). Touches every word of the range
    /// in an existing leaf and every null child slot over it with a
    /// read-modify-write, so that it is ordered with any concurrent
    /// `insert` in the range (see the module documentation).
    pub(crate) fn clear_run(&self, start: u64, count: u64) -> Vec<(&AtomicU64, u64)> {
        let end = start.saturating_add(count).min(self.folios);
        let mut cleared = Vec::new();
        if start < end {
            match &self.root {
                Root::Flat(words) => Self::clear_words(words, 0, start..end, &mut cleared),
                Root::Tree { height, node } => {
                    Self::clear_below(node, *height, 0, start..end, &mut cleared)
                }
            }
        }
        if !cleared.is_empty() {
            self.changed();
        }
        cleared
    }

    /// Sets again the bits a [`PageStateIndex::clear_run`] cleared (its
    /// punch failed).
    pub(crate) fn restore_cleared(&self, cleared: &[(&AtomicU64, u64)]) {
        for (word, bits) in cleared {
            // Release pairs with the Acquire load in `contains`.
            word.fetch_or(*bits, Ordering::Release);
        }
        if !cleared.is_empty() {
            self.changed();
        }
    }

    /// `clear_run` within one bitmap whose bit 0 is folio `base`.
    fn clear_words<'a>(
        words: &'a [AtomicU64],
        base: u64,
        range: Range<u64>,
        cleared: &mut Vec<(&'a AtomicU64, u64)>,
    ) {
        let limit = range.end.min(base + words.len() as u64 * 64);
        let mut position = range.start.max(base);
        while position < limit {
            let word_index = (position - base) / 64;
            let word_base = base + word_index * 64;
            let word_end = limit.min(word_base + 64);
            let mask = bits_between(position - word_base, word_end - word_base);
            let Some(word) = words.get(word_index as usize) else {
                return;
            };
            // AcqRel: ordered with `insert`'s AcqRel `fetch_or` of this word
            // either way (see the module documentation).
            let before = word.fetch_and(!mask, Ordering::AcqRel);
            if before & mask != 0 {
                cleared.push((word, before & mask));
            }
            position = word_end;
        }
    }

    /// `clear_run` below `node` (at `level`, covering folios from `base`).
    fn clear_below<'a>(
        node: &'a Interior,
        level: u32,
        base: u64,
        range: Range<u64>,
        cleared: &mut Vec<(&'a AtomicU64, u64)>,
    ) {
        let shift = LEAF_BITS_SHIFT + FANOUT_SHIFT * (level - 1);
        let first = if range.start > base {
            ((range.start - base) >> shift) as usize
        } else {
            0
        };
        for slot in first..FANOUT {
            let child_base = base + ((slot as u64) << shift);
            if child_base >= range.end {
                break;
            }
            // A null slot gets a null-for-null exchange, a read-modify-write
            // that an `insert` installing a node here is ordered with.
            // AcqRel on success, Acquire on failure (pairs with the
            // installer's Release, so the node is seen initialised).
            let child = match node.children[slot].compare_exchange(
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => continue,
                Err(child) => child,
            };
            if level == 1 {
                // SAFETY: height-1 children are live boxed Leaves (module
                // invariant; `&self` keeps them alive).
                let leaf = unsafe { &*child.cast::<Leaf>() };
                Self::clear_words(&leaf.words, child_base, range.clone(), cleared);
            } else {
                // SAFETY: higher children are live boxed Interiors.
                let interior = unsafe { &*child.cast::<Interior>() };
                Self::clear_below(interior, level - 1, child_base, range.clone(), cleared);
            }
        }
    }

    /// Marks `folio` absent (a one-folio [`PageStateIndex::clear_run`]).
    /// Returns whether it was present before.
    #[cfg(test)]
    pub(crate) fn remove(&self, folio: u64) -> bool {
        !self.clear_run(folio, 1).is_empty()
    }

    /// The first present folio at or after `from`, if any. Skips whole
    /// subtrees that were never used, so a sparse huge file walks fast.
    pub(crate) fn next_present(&self, from: u64) -> Option<u64> {
        if from >= self.folios {
            return None;
        }
        let found = match &self.root {
            Root::Flat(words) => Self::scan_words(words, from),
            Root::Tree { height, node } => Self::search(node, *height, 0, from),
        };
        found.filter(|folio| *folio < self.folios)
    }

    /// The first set bit at or after `from` in one bitmap (bit 0 = folio 0).
    fn scan_words(words: &[AtomicU64], from: u64) -> Option<u64> {
        let mut position = from;
        while let Some(word) = words.get((position / 64) as usize) {
            // Acquire pairs with the Release in `insert`.
            let bits = word.load(Ordering::Acquire) >> (position % 64);
            if bits != 0 {
                return Some(position + u64::from(bits.trailing_zeros()));
            }
            position = (position / 64 + 1) * 64;
        }
        None
    }

    /// Depth-first search below `node` (at `level`, covering folios from
    /// `base`) for the first present folio at or after `from`.
    fn search(node: &Interior, level: u32, base: u64, from: u64) -> Option<u64> {
        let shift = LEAF_BITS_SHIFT + FANOUT_SHIFT * (level - 1);
        let first = if from > base {
            ((from - base) >> shift) as usize
        } else {
            0
        };
        for slot in first..FANOUT {
            // Acquire pairs with the Release exchange in `child`.
            let child = node.children[slot].load(Ordering::Acquire);
            if child.is_null() {
                continue;
            }
            let child_base = base + ((slot as u64) << shift);
            let found = if level == 1 {
                // SAFETY: height-1 children are live boxed Leaves (module
                // invariant; `&self` keeps them alive).
                let leaf = unsafe { &*child.cast::<Leaf>() };
                Self::scan_words(&leaf.words, from.saturating_sub(child_base))
                    .map(|offset| child_base + offset)
            } else {
                // SAFETY: higher children are live boxed Interiors.
                let interior = unsafe { &*child.cast::<Interior>() };
                Self::search(interior, level - 1, child_base, from)
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// The first absent folio at or after `from`, or the folio count when
    /// every folio from `from` on is present. A never-used subtree is absent
    /// as a whole; a full word is passed in one comparison.
    pub(crate) fn next_absent(&self, from: u64) -> u64 {
        if from >= self.folios {
            return self.folios;
        }
        let found = match &self.root {
            Root::Flat(words) => Self::scan_words_for_absent(words, from),
            Root::Tree { height, node } => Self::search_absent(node, *height, 0, from),
        };
        // Bits past the end of the file are never set, so a flat root finds
        // its end; a tree wider than the file may find nothing.
        found.map_or(self.folios, |folio| folio.min(self.folios))
    }

    /// The first clear bit at or after `from` in one bitmap, if any.
    fn scan_words_for_absent(words: &[AtomicU64], from: u64) -> Option<u64> {
        let mut position = from;
        while let Some(word) = words.get((position / 64) as usize) {
            // Acquire pairs with the Release in `insert`. Inverted before
            // the shift, so the bits shifted in count as present.
            let clear = !word.load(Ordering::Acquire) >> (position % 64);
            if clear != 0 {
                return Some(position + u64::from(clear.trailing_zeros()));
            }
            position = (position / 64 + 1) * 64;
        }
        None
    }

    /// Depth-first search below `node` (at `level`, covering folios from
    /// `base`) for the first absent folio at or after `from`.
    fn search_absent(node: &Interior, level: u32, base: u64, from: u64) -> Option<u64> {
        let shift = LEAF_BITS_SHIFT + FANOUT_SHIFT * (level - 1);
        let first = if from > base {
            ((from - base) >> shift) as usize
        } else {
            0
        };
        for slot in first..FANOUT {
            let child_base = base + ((slot as u64) << shift);
            // Acquire pairs with the Release exchange in `child`.
            let child = node.children[slot].load(Ordering::Acquire);
            if child.is_null() {
                return Some(child_base.max(from));
            }
            let found = if level == 1 {
                // SAFETY: height-1 children are live boxed Leaves (module
                // invariant; `&self` keeps them alive).
                let leaf = unsafe { &*child.cast::<Leaf>() };
                Self::scan_words_for_absent(&leaf.words, from.saturating_sub(child_base))
                    .map(|offset| child_base + offset)
            } else {
                // SAFETY: higher children are live boxed Interiors.
                let interior = unsafe { &*child.cast::<Interior>() };
                Self::search_absent(interior, level - 1, child_base, from)
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// The runs of present folios, ascending, as `(first folio, count)`:
    /// each run is maximal (an absent folio or the end of the file follows
    /// it). Costs a word per 64 folios of each run and of each gap inside a
    /// used leaf, nothing for never-used subtrees.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut from = 0;
        std::iter::from_fn(move || {
            let start = self.next_present(from)?;
            let end = self.next_absent(start);
            from = end;
            Some((start, end - start))
        })
    }

    /// How many folios are present (a walk of the runs; for tests and
    /// reports).
    pub(crate) fn count(&self) -> u64 {
        self.runs().map(|(_, count)| count).sum()
    }

    /// Heap bytes this index holds now (for the memory-per-file report).
    pub(crate) fn heap_bytes(&self) -> usize {
        match &self.root {
            Root::Flat(words) => std::mem::size_of_val::<[AtomicU64]>(words),
            Root::Tree { height, node } => Self::tree_bytes(node, *height),
        }
    }

    fn tree_bytes(node: &Interior, height: u32) -> usize {
        let mut bytes = std::mem::size_of::<Interior>();
        for slot in &node.children {
            let child = slot.load(Ordering::Acquire);
            if child.is_null() {
                continue;
            }
            if height == 1 {
                bytes += std::mem::size_of::<Leaf>();
            } else {
                // SAFETY: above height 1 children are live boxed Interiors
                // (module invariant; `&self` keeps them alive).
                bytes += Self::tree_bytes(unsafe { &*child.cast::<Interior>() }, height - 1);
            }
        }
        bytes
    }

    fn free_tree(node: &mut Interior, height: u32) {
        for slot in &mut node.children {
            let child = slot.load(Ordering::Acquire);
            if child.is_null() {
                continue;
            }
            if height > 1 {
                // SAFETY: the child is a boxed Interior owned by this tree;
                // `&mut` proves no reader remains.
                Self::free_tree(unsafe { &mut *child.cast::<Interior>() }, height - 1);
            }
            // SAFETY: as above; the pointer is not used after this.
            unsafe { Self::free_node(child, height == 1) };
        }
    }
}

impl Drop for PageStateIndex {
    fn drop(&mut self) {
        if let Root::Tree { height, node } = &mut self.root {
            Self::free_tree(node, *height);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn small_file_is_flat_and_sized_to_the_file() {
        let index = PageStateIndex::new(16);
        assert_eq!(index.heap_bytes(), 8);
        assert!(!index.contains(3));
        assert!(index.insert(3));
        assert!(!index.insert(3));
        assert!(index.contains(3));
        assert!(!index.contains(16), "past the end is never present");
        assert!(!index.insert(16));
        assert_eq!(index.next_present(0), Some(3));
        assert_eq!(index.next_present(4), None);
        assert!(index.remove(3));
        assert_eq!(index.count(), 0);
    }

    #[test]
    fn huge_file_costs_nothing_until_used() {
        // 2^62 bytes of 4 KiB pages, as the kernel accepts.
        let folios = 1u64 << 50;
        let index = PageStateIndex::new(folios);
        let empty = index.heap_bytes();
        assert!(empty <= 512, "empty huge index holds {empty} bytes");
        let far = folios - 1;
        assert!(index.insert(far));
        assert!(index.insert(7));
        assert!(index.contains(far) && index.contains(7));
        assert!(!index.contains(far - 1));
        assert_eq!(index.next_present(0), Some(7));
        assert_eq!(index.next_present(8), Some(far));
        assert_eq!(index.count(), 2);
        assert!(index.heap_bytes() < 16 * 1024);
    }

    #[test]
    fn iteration_matches_a_reference_set() {
        let folios = 5000;
        let index = PageStateIndex::new(folios);
        let mut reference = std::collections::BTreeSet::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let folio = state % folios;
            if state & (1 << 40) == 0 {
                assert_eq!(index.insert(folio), reference.insert(folio));
            } else {
                assert_eq!(index.remove(folio), reference.remove(&folio));
            }
        }
        let mut walked = Vec::new();
        let mut from = 0;
        while let Some(folio) = index.next_present(from) {
            walked.push(folio);
            from = folio + 1;
        }
        assert_eq!(walked, reference.into_iter().collect::<Vec<_>>());
    }

    /// The maximal runs of a set of folios, as `(first, count)`.
    fn model_runs(set: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &folio in set {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == folio => *count += 1,
                _ => runs.push((folio, 1)),
            }
        }
        runs
    }

    #[test]
    fn runs_take_full_words_and_cross_word_and_leaf_boundaries() {
        // Three leaves of a height-1 tree: a run over the first leaf's end
        // into the second, a lone folio, and a run to the file's end.
        let folios = 3 * 512;
        let index = PageStateIndex::new(folios);
        assert_eq!(index.insert_run(500, 100), 100);
        assert_eq!(index.insert_run(510, 20), 0, "already present");
        assert!(index.insert(700));
        assert_eq!(index.insert_run(1400, 1000), folios - 1400, "clipped");
        assert_eq!(
            index.runs().collect::<Vec<_>>(),
            vec![(500, 100), (700, 1), (1400, folios - 1400)]
        );
        assert_eq!(index.count(), 100 + 1 + folios - 1400);
        assert_eq!(index.next_absent(500), 600);
        assert_eq!(index.next_absent(1400), folios, "present to the end");
        assert_eq!(index.next_absent(0), 0);
        assert_eq!(index.next_absent(folios), folios);
    }

    #[test]
    fn a_full_file_is_one_run_and_never_used_subtrees_are_gaps() {
        for folios in [1, 63, 64, 65, 512, 513, 40_000, 2 << 20] {
            let mut index = PageStateIndex::new(folios);
            assert_eq!(index.runs().count(), 0);
            assert_eq!(index.insert_run_unpublished(0, folios), folios);
            assert_eq!(index.runs().collect::<Vec<_>>(), vec![(0, folios)]);
        }
        // A huge sparse file: runs far apart, the subtrees between never
        // allocated.
        let folios = 1u64 << 40;
        let index = PageStateIndex::new(folios);
        index.insert_run(5, 3);
        index.insert_run(folios - 70, 70);
        assert_eq!(
            index.runs().collect::<Vec<_>>(),
            vec![(5, 3), (folios - 70, 70)]
        );
        assert_eq!(index.next_absent(5), 8);
        assert!(index.heap_bytes() < 16 * 1024);
    }

    #[test]
    fn generation_counts_changes_of_the_set_only() {
        let mut index = PageStateIndex::new(4096);
        let start = index.generation();
        assert!(index.insert(3));
        assert!(!index.insert(3));
        assert_eq!(index.generation(), start + 1, "a no-op insert is no change");
        assert_eq!(index.insert_run(0, 10), 9);
        assert_eq!(index.insert_run(0, 10), 0);
        assert_eq!(index.generation(), start + 2, "one change per run");
        assert!(!index.remove(100));
        assert_eq!(index.generation(), start + 2);
        assert!(index.remove(3));
        assert_eq!(index.generation(), start + 3);
        assert_eq!(index.insert_run_unpublished(2000, 100), 100);
        assert_eq!(index.insert_run_unpublished(2000, 100), 0);
        assert_eq!(index.generation(), start + 4);
    }

    /// One operation of the property test.
    #[derive(Clone, Debug)]
    enum Operation {
        Insert(u64),
        Remove(u64),
        ClearRun(u64, u64),
        InsertRun(u64, u64),
        InsertRunUnpublished(u64, u64),
    }

    fn operation(folios: u64) -> impl Strategy<Value = Operation> {
        use proptest::prelude::*;
        // Runs up to three leaves long, anywhere (also past the end).
        let position = 0..folios + 64;
        prop_oneof![
            position.clone().prop_map(Operation::Insert),
            position.clone().prop_map(Operation::Remove),
            (position.clone(), 0..1600u64)
                .prop_map(|(start, count)| Operation::ClearRun(start, count)),
            (position.clone(), 0..1600u64)
                .prop_map(|(start, count)| Operation::InsertRun(start, count)),
            (position, 0..1600u64)
                .prop_map(|(start, count)| Operation::InsertRunUnpublished(start, count)),
        ]
    }

    proptest::proptest! {
        #[test]
        fn runs_and_folios_agree_with_a_model(
            (folios, operations) in proptest::prop_oneof![
                // Flat roots, one-level trees, two-level trees.
                1u64..=512, 513u64..=32_768, 32_769u64..=70_000
            ]
            .prop_flat_map(|folios| (
                proptest::strategy::Just(folios),
                proptest::collection::vec(operation(folios), 1..60),
            ))
        ) {
            use proptest::prelude::*;
            let mut index = PageStateIndex::new(folios);
            let mut model = std::collections::BTreeSet::new();
            for operation in operations {
                let generation = index.generation();
                let before = model.len();
                match operation {
                    Operation::Insert(folio) => {
                        let expected = folio < folios && model.insert(folio);
                        prop_assert_eq!(index.insert(folio), expected);
                    }
                    Operation::Remove(folio) => {
                        prop_assert_eq!(index.remove(folio), model.remove(&folio));
                    }
                    Operation::ClearRun(start, count) => {
                        let end = start.saturating_add(count).min(folios);
                        let removed = (start..end).filter(|folio| model.remove(folio)).count() as u64;
                        let cleared = index.clear_run(start, count);
                        let bits: u64 = cleared.iter().map(|(_, bits)| u64::from(bits.count_ones())).sum();
                        prop_assert_eq!(bits, removed);
                    }
                    Operation::InsertRun(start, count) | Operation::InsertRunUnpublished(start, count) => {
                        let end = start.saturating_add(count).min(folios);
                        let added = (start..end).filter(|folio| model.insert(*folio)).count() as u64;
                        let inserted = match operation {
                            Operation::InsertRun(..) => index.insert_run(start, count),
                            _ => index.insert_run_unpublished(start, count),
                        };
                        prop_assert_eq!(inserted, added);
                    }
                }
                let changed = u64::from(model.len() != before);
                prop_assert_eq!(index.generation(), generation + changed);
            }
            let runs = model_runs(&model);
            prop_assert_eq!(index.runs().collect::<Vec<_>>(), runs.clone());
            let mut folio_walk = Vec::new();
            let mut from = 0;
            while let Some(folio) = index.next_present(from) {
                folio_walk.push(folio);
                from = folio + 1;
            }
            prop_assert_eq!(folio_walk, model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(index.count(), model.len() as u64);
            // Every run's first folio, its end, and folios in between.
            let probes = runs
                .iter()
                .flat_map(|&(first, count)| [first, first + count / 2, first + count])
                .chain((0..folios).step_by(((folios / 31) as usize).max(1)));
            for folio in probes {
                let expected = runs
                    .iter()
                    .find(|&&(first, count)| first <= folio && folio < first + count)
                    .map_or(folio.min(folios), |&(first, count)| first + count);
                prop_assert_eq!(index.next_absent(folio), expected);
            }
        }
    }
}

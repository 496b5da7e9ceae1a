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
        PageStateIndex { folios, root }
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
        // winner's Release so its node is seen initialised.
        match slot.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::Release,
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
        // Release pairs with the Acquire load in `contains`.
        words[word].fetch_or(mask, Ordering::Release) & mask == 0
    }

    /// Marks `folio` absent. Returns whether it was present before.
    pub(crate) fn remove(&self, folio: u64) -> bool {
        if folio >= self.folios {
            return false;
        }
        let Some(words) = self.words(folio, false) else {
            return false;
        };
        let (word, mask) = word_and_mask(folio % LEAF_BITS);
        // Release: a reader that sees the bit clear sees what preceded the
        // clearing (pairs with the Acquire in `contains`).
        words[word].fetch_and(!mask, Ordering::Release) & mask != 0
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

    /// How many folios are present (a walk; for tests and reports).
    pub(crate) fn count(&self) -> u64 {
        let mut count = 0;
        let mut from = 0;
        while let Some(folio) = self.next_present(from) {
            count += 1;
            from = folio + 1;
        }
        count
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
}

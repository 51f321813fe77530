//! A least-recently-used list over a slab: entries keep their slab index
//! (which is also where their data is stored) for as long as they live.

use std::collections::HashMap;

const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Node<T> {
    key: u64,
    value: T,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// Values by key, in order of use.
#[derive(Debug)]
pub(super) struct Lru<T> {
    index: HashMap<u64, usize>,
    nodes: Vec<Option<Node<T>>>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
}

impl<T> Lru<T> {
    pub(super) fn new() -> Self {
        Lru {
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// The slab index of `key`.
    pub(super) fn find(&self, key: u64) -> Option<usize> {
        self.index.get(&key).copied()
    }

    /// The key and value at `idx`.
    pub(super) fn at(&self, idx: usize) -> Option<(u64, &T)> {
        self.nodes
            .get(idx)
            .and_then(Option::as_ref)
            .map(|n| (n.key, &n.value))
    }

    /// The value at `idx`, to change.
    pub(super) fn at_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.nodes
            .get_mut(idx)
            .and_then(Option::as_mut)
            .map(|n| &mut n.value)
    }

    fn unlink(&mut self, idx: usize) {
        let (prev, next) = match &self.nodes[idx] {
            Some(n) => (n.prev, n.next),
            None => return,
        };
        match prev {
            NIL => self.head = next,
            p => {
                if let Some(n) = &mut self.nodes[p] {
                    n.next = next;
                }
            }
        }
        match next {
            NIL => self.tail = prev,
            x => {
                if let Some(n) = &mut self.nodes[x] {
                    n.prev = prev;
                }
            }
        }
    }

    fn push_front(&mut self, idx: usize) {
        let old = self.head;
        if let Some(n) = &mut self.nodes[idx] {
            n.prev = NIL;
            n.next = old;
        }
        if old == NIL {
            self.tail = idx;
        } else if let Some(n) = &mut self.nodes[old] {
            n.prev = idx;
        }
        self.head = idx;
    }

    /// Mark `idx` as just used.
    pub(super) fn touch(&mut self, idx: usize) {
        if self.head != idx && self.nodes.get(idx).is_some_and(Option::is_some) {
            self.unlink(idx);
            self.push_front(idx);
        }
    }

    /// Add `key` (not present) as the most recently used; its slab index.
    pub(super) fn insert(&mut self, key: u64, value: T) -> usize {
        let node = Some(Node {
            key,
            value,
            prev: NIL,
            next: NIL,
        });
        let idx = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.index.insert(key, idx);
        self.push_front(idx);
        idx
    }

    /// Take `idx` out; its index may be reused by the next insert.
    pub(super) fn remove(&mut self, idx: usize) -> Option<(u64, T)> {
        self.nodes.get(idx)?.as_ref()?;
        self.unlink(idx);
        let n = self.nodes[idx].take()?;
        self.index.remove(&n.key);
        self.free.push(idx);
        Some((n.key, n.value))
    }

    /// Slab indexes from the least recently used up.
    pub(super) fn oldest_first(&self) -> impl Iterator<Item = usize> + '_ {
        let mut at = self.tail;
        std::iter::from_fn(move || {
            let idx = at;
            let n = self.nodes.get(idx)?.as_ref()?;
            at = n.prev;
            Some(idx)
        })
    }

    /// Every key.
    pub(super) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.keys().copied()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn order(l: &Lru<u32>) -> Vec<u64> {
        l.oldest_first().map(|i| l.at(i).unwrap().0).collect()
    }

    #[test]
    fn use_order_and_slot_reuse() {
        let mut l = Lru::new();
        let a = l.insert(10, 1);
        let b = l.insert(20, 2);
        let c = l.insert(30, 3);
        assert_eq!(order(&l), [10, 20, 30]);
        l.touch(a);
        assert_eq!(order(&l), [20, 30, 10]);
        l.touch(a);
        assert_eq!(order(&l), [20, 30, 10]);
        assert_eq!(l.remove(b), Some((20, 2)));
        assert_eq!(l.remove(b), None);
        assert_eq!(order(&l), [30, 10]);
        assert_eq!(l.insert(40, 4), b, "a freed slot is reused");
        assert_eq!(order(&l), [30, 10, 40]);
        assert_eq!(l.find(30), Some(c));
        *l.at_mut(c).unwrap() = 33;
        assert_eq!(l.at(c), Some((30, &33)));
        l.remove(c);
        l.remove(a);
        l.remove(b);
        assert_eq!(l.len(), 0);
        assert_eq!(order(&l), Vec::<u64>::new());
        l.insert(1, 1);
        assert_eq!(order(&l), [1]);
    }
}

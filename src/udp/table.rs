//! The association table: bounded, ordered by last activity, plain data (no sockets, no
//! clock: callers pass `now`). One table holds the UDP associations, keyed by client
//! address:port for TPROXY (full cone: one association per client source port, whatever it
//! talks to) or by a serial for SOCKS5 UDP ASSOCIATE (dispatched by the relay socket's token,
//! never looked up by address); a second one holds the per-destination reply sockets.
//!
//! Invariants: entries live in a slot vector and are named by an [`Id`] (slot index and
//! generation), so a stale id, e.g. an epoll token for a socket already closed, finds nothing
//! rather than the slot's next tenant; the slots form a list from least to most recently
//! active, so the idle sweep ([`Table::pop_expired`]) and eviction of the oldest idle entry
//! when full ([`Table::insert`]) are O(1) each and never scan; at most `max` entries exist, so
//! slot indexes stay below `max`; per-datagram operations (`find`, `touch`, `get_mut`) never
//! allocate (slots and the index grow only when an association is created).
//!
//! A kernel fast path (a tc program, later) could take over a direct-mode flow by mirroring
//! an entry into BPF maps; what it would need from here:
//! - out, at the LAN interface: key {client IP (16 bytes, IPv4 as v4-mapped), client port} ->
//!   value {upstream socket's local IP and port, slot index}; the program rewrites the source
//!   and redirects (full cone: any destination, as the relay does);
//! - back, at the WAN interface: key {upstream local IP, port} -> value {client IP, port, slot
//!   index}; the program rewrites the destination to the client and the source stays the
//!   server's, which is what the transparent reply socket does in userspace;
//! - counters: an array map indexed by the slot index ({datagrams, bytes} each way and
//!   `last_seen_ns`). Slot indexes are dense and below `max`, which is why this table uses a
//!   slot vector and not a bare hash map. An offloaded flow's datagrams never reach the relay,
//!   so before expiring or evicting such an entry the sweep must read `last_seen_ns` and
//!   [`Table::touch`] it when the kernel saw traffic; the log line adds both counters.
//!
//! The upstream socket stays open while the kernel forwards: it holds the port and still
//! reports ICMP errors. SOCKS5 and shadowsocks flows add or strip a header per datagram; they
//! stay in userspace.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

const NIL: u32 = u32::MAX;
/// Generations use 24 bits, so an [`Id`] packs into 56 and the loop keeps a byte of its token.
const GEN_MASK: u32 = 0x00ff_ffff;

/// Names one entry for as long as it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Id {
    index: u32,
    gen: u32,
}

impl Id {
    /// The slot index: dense, below the table's `max`.
    pub fn index(self) -> u32 {
        self.index
    }

    /// Packs into the low 56 bits (generation above index).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.gen) << 32) | u64::from(self.index)
    }

    /// The inverse of [`Id::to_u64`]; the top byte is ignored.
    pub fn from_u64(token: u64) -> Id {
        Id {
            index: token as u32,
            gen: (token >> 32) as u32 & GEN_MASK,
        }
    }
}

/// Table-wide counts for the stats line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub inserted: u64,
    pub expired: u64,
    pub evicted: u64,
    pub removed: u64,
    pub peak: usize,
}

struct Slot<K, V> {
    gen: u32,
    older: u32,
    newer: u32,
    last: Instant,
    entry: Option<(K, V)>,
}

/// What [`Table::insert`] did.
#[derive(Debug)]
pub struct Inserted<K, V> {
    pub id: Id,
    /// The entry evicted to make room (the table was full), for the caller to close and log.
    pub evicted: Option<(K, V)>,
}

pub struct Table<K, V> {
    slots: Vec<Slot<K, V>>,
    free: Vec<u32>,
    index: HashMap<K, u32>,
    oldest: u32,
    newest: u32,
    max: usize,
    timeout: Duration,
    stats: Stats,
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    /// A table of at most `max` (at least 1) entries that expire after `timeout` idle.
    pub fn new(max: usize, timeout: Duration) -> Table<K, V> {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            oldest: NIL,
            newest: NIL,
            max: max.clamp(1, NIL as usize),
            timeout,
            stats: Stats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn find(&self, key: &K) -> Option<Id> {
        let index = *self.index.get(key)?;
        Some(Id {
            index,
            gen: self.slots[index as usize].gen,
        })
    }

    fn slot(&self, id: Id) -> Option<&Slot<K, V>> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.gen == id.gen && s.entry.is_some())
    }

    pub fn get(&self, id: Id) -> Option<(&K, &V)> {
        self.slot(id)?.entry.as_ref().map(|(k, v)| (k, v))
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut V> {
        self.slot(id)?;
        self.slots[id.index as usize].entry.as_mut().map(|(_, v)| v)
    }

    /// When the entry was last active.
    pub fn last(&self, id: Id) -> Option<Instant> {
        self.slot(id).map(|s| s.last)
    }

    /// Marks the entry active at `now` (the newest); `now` earlier than the newest entry's
    /// time counts as that time, so the list stays ordered.
    pub fn touch(&mut self, id: Id, now: Instant) -> Option<&mut V> {
        self.slot(id)?;
        let now = match self.newest {
            NIL => now,
            n => now.max(self.slots[n as usize].last),
        };
        self.unlink(id.index);
        self.push_newest(id.index, now);
        self.slots[id.index as usize].entry.as_mut().map(|(_, v)| v)
    }

    /// Adds an entry active at `now`. When the table is full the least recently active entry
    /// is evicted first (counted) and handed back. A key already present is refused and the
    /// pair handed back unchanged.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Result<Inserted<K, V>, (K, V)> {
        if self.index.contains_key(&key) {
            return Err((key, value));
        }
        let evicted = if self.len() >= self.max {
            self.stats.evicted += 1;
            self.take(self.oldest)
        } else {
            None
        };
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    older: NIL,
                    newer: NIL,
                    last: now,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let now = match self.newest {
            NIL => now,
            n => now.max(self.slots[n as usize].last),
        };
        self.index.insert(key.clone(), index);
        self.slots[index as usize].entry = Some((key, value));
        self.push_newest(index, now);
        self.stats.inserted += 1;
        self.stats.peak = self.stats.peak.max(self.len());
        let gen = self.slots[index as usize].gen;
        Ok(Inserted {
            id: Id { index, gen },
            evicted,
        })
    }

    /// Removes an entry (its association ended for a reason the caller logs).
    pub fn remove(&mut self, id: Id) -> Option<(K, V)> {
        self.slot(id)?;
        self.stats.removed += 1;
        self.take(id.index)
    }

    /// When the least recently active entry expires, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        match self.oldest {
            NIL => None,
            i => Some(self.slots[i as usize].last + self.timeout),
        }
    }

    /// Removes and returns the least recently active entry if it has been idle for the
    /// timeout at `now` (counted); call until `None`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(K, V)> {
        if self.deadline()? > now {
            return None;
        }
        self.stats.expired += 1;
        self.take(self.oldest)
    }

    /// Every live entry, least recently active first.
    pub fn iter(&self) -> impl Iterator<Item = (Id, &K, &V)> + '_ {
        let mut at = self.oldest;
        std::iter::from_fn(move || {
            let slot = self.slots.get(at as usize)?;
            let (k, v) = slot.entry.as_ref()?;
            let id = Id {
                index: at,
                gen: slot.gen,
            };
            at = slot.newer;
            Some((id, k, v))
        })
    }

    fn take(&mut self, index: u32) -> Option<(K, V)> {
        let (key, value) = self.slots.get_mut(index as usize)?.entry.take()?;
        self.unlink(index);
        let slot = &mut self.slots[index as usize];
        slot.gen = slot.gen.wrapping_add(1) & GEN_MASK;
        self.index.remove(&key);
        self.free.push(index);
        Some((key, value))
    }

    fn unlink(&mut self, index: u32) {
        let (older, newer) = {
            let s = &self.slots[index as usize];
            (s.older, s.newer)
        };
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
    }

    fn push_newest(&mut self, index: u32, now: Instant) {
        let prev = self.newest;
        {
            let s = &mut self.slots[index as usize];
            s.older = prev;
            s.newer = NIL;
            s.last = now;
        }
        match prev {
            NIL => self.oldest = index,
            p => self.slots[p as usize].newer = index,
        }
        self.newest = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    /// The keys from least to most recently active.
    fn order(t: &Table<u32, &'static str>) -> Vec<u32> {
        t.iter().map(|(_, k, _)| *k).collect()
    }

    /// Insert, find, get, remove; a removed entry's id finds nothing, even once its slot is
    /// reused by the next entry (the generation changed).
    #[test]
    fn basic_and_stale_ids() {
        let t0 = Instant::now();
        let mut t = Table::new(4, T);
        let a = t.insert(1, "a", t0).unwrap().id;
        let b = t.insert(2, "b", t0).unwrap().id;
        assert_eq!((t.len(), t.find(&1), t.find(&2)), (2, Some(a), Some(b)));
        assert_eq!(t.get(a), Some((&1, &"a")));
        assert_eq!(t.remove(a), Some((1, "a")));
        assert_eq!((t.get(a), t.find(&1)), (None, None));
        assert_eq!(t.remove(a), None);
        let c = t.insert(3, "c", t0).unwrap().id;
        assert_eq!(c.index(), a.index(), "slot reused");
        assert_eq!(t.get(a), None);
        assert_eq!(t.get_mut(a), None);
        assert_eq!(t.touch(a, t0), None);
        assert_eq!(t.get(c), Some((&3, &"c")));
        assert_eq!(t.stats().removed, 1);
    }

    /// A key already present is refused and the pair handed back; nothing changes.
    #[test]
    fn duplicate_key_refused() {
        let t0 = Instant::now();
        let mut t = Table::new(4, T);
        let a = t.insert(1, "a", t0).unwrap().id;
        assert_eq!(t.insert(1, "again", t0).unwrap_err(), (1, "again"));
        assert_eq!((t.len(), t.get(a)), (1, Some((&1, &"a"))));
    }

    /// Touching moves an entry to the newest end; the list stays ordered by activity.
    #[test]
    fn touch_orders_by_activity() {
        let t0 = Instant::now();
        let mut t = Table::new(8, T);
        let ids: Vec<Id> = (1..=4)
            .map(|k| t.insert(k, "x", at(t0, k as u64)).unwrap().id)
            .collect();
        assert_eq!(order(&t), [1, 2, 3, 4]);
        t.touch(ids[0], at(t0, 10));
        t.touch(ids[2], at(t0, 11));
        assert_eq!(order(&t), [2, 4, 1, 3]);
        assert_eq!(t.last(ids[2]), Some(at(t0, 11)));
        // A clock reading older than the newest entry counts as the newest's time.
        t.touch(ids[1], at(t0, 5));
        assert_eq!(
            (order(&t), t.last(ids[1])),
            (vec![4, 1, 3, 2], Some(at(t0, 11)))
        );
    }

    /// When full, inserting evicts the least recently active entry, counts it and hands it
    /// back; a recently touched old entry survives.
    #[test]
    fn full_table_evicts_oldest_idle() {
        let t0 = Instant::now();
        let mut t = Table::new(3, T);
        let a = t.insert(1, "a", at(t0, 1)).unwrap().id;
        t.insert(2, "b", at(t0, 2)).unwrap();
        t.insert(3, "c", at(t0, 3)).unwrap();
        t.touch(a, at(t0, 4));
        let ins = t.insert(4, "d", at(t0, 5)).unwrap();
        assert_eq!(ins.evicted, Some((2, "b")));
        assert_eq!((t.len(), t.find(&2), order(&t)), (3, None, vec![3, 1, 4]));
        assert_eq!(t.stats().evicted, 1);
        assert_eq!(t.stats().peak, 3);
    }

    /// Entries expire in order once idle for the timeout, not before; the deadline is the
    /// oldest entry's.
    #[test]
    fn expiry() {
        let t0 = Instant::now();
        let mut t = Table::new(8, T);
        assert_eq!((t.deadline(), t.pop_expired(at(t0, 999))), (None, None));
        let a = t.insert(1, "a", at(t0, 0)).unwrap().id;
        t.insert(2, "b", at(t0, 10)).unwrap();
        t.insert(3, "c", at(t0, 20)).unwrap();
        t.touch(a, at(t0, 30));
        assert_eq!(t.deadline(), Some(at(t0, 70)));
        assert_eq!(t.pop_expired(at(t0, 69)), None);
        assert_eq!(t.pop_expired(at(t0, 80)), Some((2, "b")));
        assert_eq!(t.pop_expired(at(t0, 80)), Some((3, "c")));
        assert_eq!(t.pop_expired(at(t0, 80)), None);
        assert_eq!(t.deadline(), Some(at(t0, 90)));
        assert_eq!(t.stats().expired, 2);
    }

    /// Ids pack into 56 bits and unpack to themselves; a slot's generation wraps within 24
    /// bits, and the wrapped id still differs from the one before.
    #[test]
    fn id_packing() {
        let top = Id {
            index: u32::MAX - 1,
            gen: GEN_MASK,
        };
        assert_eq!(top.to_u64(), (1 << 56) - 2);
        assert_eq!(Id::from_u64(top.to_u64() | 0xab << 56), top);
        let t0 = Instant::now();
        let mut t = Table::new(2, T);
        let first = t.insert(7, "x", t0).unwrap().id;
        t.slots[first.index as usize].gen = GEN_MASK;
        let old = t.find(&7).unwrap();
        assert_eq!(old.to_u64() >> 32, u64::from(GEN_MASK));
        t.remove(old);
        let new = t.insert(7, "y", t0).unwrap().id;
        assert_eq!((new.index, new.gen), (old.index, 0));
        assert_eq!((t.get(old), t.get(new)), (None, Some((&7, &"y"))));
    }

    /// A seeded random mix of inserts, touches, removals and expiry agrees with a plain
    /// reference model, and slot indexes stay below `max`.
    #[test]
    fn random_against_model() {
        let t0 = Instant::now();
        let max = 16;
        let mut t: Table<u32, u32> = Table::new(max, T);
        // The model: (key, value, last activity) least recent first.
        let mut model: Vec<(u32, u32, Instant)> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = t0;
        for step in 0..20_000u32 {
            now += Duration::from_millis(rand(3000));
            let key = rand(40) as u32;
            match rand(4) {
                0 | 1 => {
                    let res = t.insert(key, step, now);
                    if model.iter().any(|e| e.0 == key) {
                        assert!(res.is_err());
                        continue;
                    }
                    let ins = res.unwrap();
                    let evicted = (model.len() == max).then(|| model.remove(0));
                    assert_eq!(ins.evicted, evicted.map(|e| (e.0, e.1)));
                    assert!((ins.id.index() as usize) < max);
                    model.push((key, step, now));
                }
                2 => {
                    let found = t.find(&key).and_then(|id| t.touch(id, now)).copied();
                    let pos = model.iter().position(|e| e.0 == key);
                    assert_eq!(found, pos.map(|p| model[p].1));
                    if let Some(p) = pos {
                        let mut e = model.remove(p);
                        e.2 = now;
                        model.push(e);
                    }
                }
                _ => {
                    while let Some((k, v)) = t.pop_expired(now) {
                        let e = model.remove(0);
                        assert_eq!((k, v), (e.0, e.1));
                        assert!(e.2 + T <= now);
                    }
                    assert!(model.first().map_or(true, |e| e.2 + T > now));
                }
            }
            let keys: Vec<u32> = t.iter().map(|(_, k, _)| *k).collect();
            let want: Vec<u32> = model.iter().map(|e| e.0).collect();
            assert_eq!(keys, want, "step {step}");
        }
    }

    /// An association's slot stays within the 288 bytes (x86_64) docs/UDP.md quotes (the
    /// index adds about 64 more, the kernel sockets a few KiB of slab that RSS does not show).
    #[test]
    fn slot_size() {
        use crate::udp::assoc::{Assoc, Key};
        let size = std::mem::size_of::<Slot<Key, Assoc>>();
        assert!(size <= 288, "{size} bytes per association slot");
    }

    /// Looking up and touching an association, what every datagram does, allocates nothing.
    #[test]
    fn per_datagram_operations_do_not_allocate() {
        let t0 = Instant::now();
        let mut t: Table<std::net::SocketAddr, u64> = Table::new(1000, T);
        let clients: Vec<std::net::SocketAddr> = (0..1000)
            .map(|p| ([198, 18, 1, 2], 10_000 + p).into())
            .collect();
        for (i, c) in clients.iter().enumerate() {
            t.insert(*c, 0, at(t0, i as u64)).unwrap();
        }
        let allocs = crate::sys::alloc_count::during(|| {
            for (i, c) in clients.iter().enumerate().rev() {
                let id = t.find(c).unwrap();
                *t.touch(id, at(t0, 2000 + i as u64)).unwrap() += 1;
                *t.get_mut(id).unwrap() += 1;
            }
        });
        assert_eq!(allocs, 0);
        assert_eq!(t.iter().next().map(|(_, k, _)| *k), Some(clients[999]));
    }
}

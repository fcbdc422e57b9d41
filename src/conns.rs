//! The open connections: a slab of slots, each holding a connection and its stage (setup, or
//! a relay on the data plane). A slot's generation changes whenever its connection is freed,
//! and epoll tokens carry it, so an event for a connection closed earlier in the same batch is
//! recognised as stale instead of reaching the slot's next tenant.
//!
//! Invariant: `open()` is the number of occupied slots; a freed slot is reused only after its
//! generation moved on.

use crate::conn::Conn;
use crate::end::Side;
use crate::plane::{Plane, Relay};
use crate::setup::Setup;
use crate::sock::Sock;
use crate::stats::Open;
use crate::token::{Token, GEN_MASK};

/// Where a connection is in its life.
pub enum Stage {
    Setup(Box<Setup>),
    /// On the data plane, with the connected upstream socket.
    Relay {
        upstream: Sock,
        relay: Relay,
    },
}

pub struct Entry {
    pub conn: Conn,
    pub stage: Stage,
}

impl Stage {
    /// The upstream socket, once there is one.
    pub fn upstream(&self) -> Option<&Sock> {
        match self {
            Stage::Setup(s) => s.upstream.as_ref(),
            Stage::Relay { upstream, .. } => Some(upstream),
        }
    }
}

struct Slot {
    gen: u32,
    entry: Option<Entry>,
}

#[derive(Default)]
pub struct Conns {
    slots: Vec<Slot>,
    free: Vec<usize>,
    open: usize,
}

impl Conns {
    pub fn open(&self) -> usize {
        self.open
    }

    /// What the stats line needs of each open connection (`stats::Open`).
    pub fn figures<'a>(&'a self, plane: &'a Plane) -> impl Iterator<Item = Open> + 'a {
        self.iter().map(move |e| {
            let (name, (up, down)) = match &e.stage {
                Stage::Setup(_) => (None, (0, 0)),
                Stage::Relay { relay, .. } => (Some(relay.name()), relay.bytes(plane)),
            };
            let (up, down) = (up + e.conn.pre[0], down + e.conn.pre[1]);
            Open {
                plane: name,
                up,
                down,
            }
        })
    }

    /// Takes `entry` into a free slot and returns the slot's index.
    pub fn insert(&mut self, entry: Entry) -> usize {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    entry: None,
                });
                self.slots.len() - 1
            }
        };
        self.slots[idx].entry = Some(entry);
        self.open += 1;
        idx
    }

    /// The epoll token of `side` of the connection in slot `idx`.
    pub fn token(&self, idx: usize, side: Side) -> u64 {
        let gen = self.slots.get(idx).map_or(0, |s| s.gen);
        Token::Conn { gen, idx, side }.encode()
    }

    /// The slot `idx` if it still holds the connection of generation `gen`.
    pub fn live(&mut self, gen: u32, idx: usize) -> Option<&mut Entry> {
        match self.slots.get_mut(idx) {
            Some(s) if s.gen == gen => s.entry.as_mut(),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, idx: usize) -> Option<&mut Entry> {
        self.slots.get_mut(idx)?.entry.as_mut()
    }

    /// Frees slot `idx`, returning its connection; its generation moves on.
    pub fn remove(&mut self, idx: usize) -> Option<Entry> {
        let slot = self.slots.get_mut(idx)?;
        let entry = slot.entry.take()?;
        slot.gen = slot.gen.wrapping_add(1) & GEN_MASK;
        self.free.push(idx);
        self.open -= 1;
        Some(entry)
    }

    /// Every slot index, occupied or not (for sweeps that may free slots as they go).
    pub fn indices(&self) -> std::ops::Range<usize> {
        0..self.slots.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter_map(|s| s.entry.as_ref())
    }
}

//! Versions: what orders every write, and the text form answers carry.
//!
//! Owns: [`Version`] (the hybrid timestamp, then the writer's node id) and
//! [`VersionText`], a version's text built on the stack.
//! Must not touch: entries, the map, the limits; of the clock, only the
//! reading of a timestamp's parts ([`hlc_ms`], [`hlc_logical`]).

use std::fmt;

use super::clock::{hlc_logical, hlc_ms};

/// Orders writes: the hybrid timestamp first, the writer's node id second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Hybrid logical clock value (see [`clock`](super::clock)).
    pub hlc: u64,
    /// Node id of the writer; breaks ties between equal timestamps.
    pub node: u64,
}

impl Version {
    /// The text form, `<wall ms>.<logical>@<node id hex>`, e.g.
    /// `1764222930123.0@9f3a...`, built on the stack: every answer carries
    /// one, and `fmt` costs several times more.
    pub fn text(&self) -> VersionText {
        let mut text = VersionText {
            bytes: [0; VersionText::CAPACITY],
            len: 0,
        };
        let mut numbers = itoa::Buffer::new();
        text.push(numbers.format(hlc_ms(self.hlc)).as_bytes());
        text.push(b".");
        text.push(numbers.format(hlc_logical(self.hlc)).as_bytes());
        text.push(b"@");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = HEX[((self.node >> (60 - 4 * i)) & 0xf) as usize];
        }
        text.push(&hex);
        text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

/// A [`Version`]'s text, held on the stack.
#[derive(Clone, Copy)]
pub struct VersionText {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl VersionText {
    /// Two 20-digit numbers, `.`, `@` and 16 hex digits fit.
    const CAPACITY: usize = 64;

    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, '.', '@' and hex digits are ever pushed.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

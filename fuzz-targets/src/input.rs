//! Reading structured choices out of the fuzzer's bytes: each read takes what it needs, and
//! an exhausted input reads as zeros (so every input is a complete run).

/// The fuzzer's bytes, read front to back.
#[derive(Debug)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// One byte (0 once exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((b, rest)) => {
                self.rest = rest;
                *b
            }
            None => 0,
        }
    }

    /// A number below `n` (n ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// `N` bytes.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        core::array::from_fn(|_| self.byte())
    }

    /// Up to `max` bytes, the length read first.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = usize::from(self.u16()) % (max + 1);
        let take = len.min(self.rest.len());
        let (head, rest) = self.rest.split_at(take);
        self.rest = rest;
        head.to_vec()
    }
}

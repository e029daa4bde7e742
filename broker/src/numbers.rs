//! Random number allocation inside the broker's prefixes.
//!
//! Numbers are drawn uniformly at random (never sequentially, so a number says nothing about
//! when it was given out or who is next); uniqueness is the store's job (a unique key, and the
//! caller draws again on a collision).

use rand_core::CryptoRngCore;

/// Draws numbers of `length` digits under one of `prefixes`.
#[derive(Debug, Clone)]
pub struct NumberAllocator {
    prefixes: Vec<String>,
    length: usize,
}

impl NumberAllocator {
    /// Prefixes must be digits shorter than `length` (checked by the config).
    pub fn new(prefixes: Vec<String>, length: usize) -> Self {
        Self { prefixes, length }
    }

    /// One random candidate number.
    pub fn draw<R: CryptoRngCore + ?Sized>(&self, rng: &mut R) -> String {
        let prefix = &self.prefixes[uniform(rng, self.prefixes.len() as u32) as usize];
        let mut number = String::with_capacity(self.length);
        number.push_str(prefix);
        while number.len() < self.length {
            number.push(char::from(b'0' + uniform(rng, 10) as u8));
        }
        number
    }

    /// True when `number` lies inside one of this allocator's prefixes and has the right length.
    pub fn owns(&self, number: &str) -> bool {
        number.len() == self.length && self.prefixes.iter().any(|p| number.starts_with(p.as_str()))
    }
}

/// Uniform in `0..n` without modulo bias (rejection sampling).
fn uniform<R: CryptoRngCore + ?Sized>(rng: &mut R, n: u32) -> u32 {
    let n = n.max(1);
    let zone = u32::MAX - (u32::MAX % n);
    loop {
        let v = rng.next_u32();
        if v < zone {
            return v % n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use std::collections::HashSet;

    #[test]
    fn numbers_have_the_prefix_and_length_and_are_not_sequential() {
        let a = NumberAllocator::new(vec!["555".into(), "777".into()], 10);
        let drawn: Vec<String> = (0..1000).map(|_| a.draw(&mut OsRng)).collect();
        assert!(drawn.iter().all(|n| a.owns(n)));
        assert!(drawn.iter().all(|n| n.bytes().all(|b| b.is_ascii_digit())));
        let distinct: HashSet<_> = drawn.iter().collect();
        assert!(
            distinct.len() > 995,
            "random draws in 10^7 should rarely collide"
        );
        let increasing = drawn.windows(2).filter(|w| w[0] < w[1]).count();
        assert!(
            (300..700).contains(&increasing),
            "about half of consecutive draws increase when random, got {increasing}"
        );
        assert!(drawn.iter().any(|n| n.starts_with("555")));
        assert!(drawn.iter().any(|n| n.starts_with("777")));
    }

    #[test]
    fn owns_checks_prefix_and_length() {
        let a = NumberAllocator::new(vec!["555".into()], 10);
        assert!(a.owns("5551234567"));
        assert!(!a.owns("5561234567"));
        assert!(!a.owns("555123456"));
    }
}

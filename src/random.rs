//! Randomness for secrets, from the operating system's generator.

/// `N` bytes from the OS generator.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    fill(&mut buf);
    buf
}

/// Fills `buf` from the OS generator.
pub fn fill(buf: &mut [u8]) {
    // The OS generator failing means the host is unusable for key material; refusing to go on
    // is the only safe answer, and it cannot be triggered from the network.
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

//! Shared inputs for garret's benchmarks.

/// Deterministic bytes with the texture of build outputs: runs of repeated
/// phrases mixed with noise, compressing about 3:1 with zstd-3 (see the
/// ratio the store bench prints), so neither compression extreme flatters us.
pub fn build_output_like(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"/nix/store/",
        b"lib",
        b"\x7fELF\x02\x01\x01",
        b"_ZN4core3fmt",
        b"\0\0\0\0\0\0\0\0",
        b"GLIBC_2.34",
        b".so.6",
        b"#include <stdio.h>\n",
    ];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let r = next();
        if r % 3 == 0 {
            out.extend_from_slice(&r.to_le_bytes());
        } else {
            out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

/// Deterministic bytes that do not compress (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> bytes::Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// A seed unique to this run, so blobs are new to a server that saw
/// earlier runs.
pub fn run_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // The low 64 bits vary fastest; the pid separates simultaneous runs.
    let low = u64::try_from(nanos & u128::from(u64::MAX)).expect("masked to 64 bits");
    low ^ (u64::from(std::process::id()) << 32)
}

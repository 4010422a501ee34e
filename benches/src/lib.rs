//! Shared inputs for garret's benchmarks, and the `/proc` probe the load
//! generators read a server's memory and CPU through.

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

/// A UUID-shaped upload id derived from `seed`, as a Bazel client names
/// its ByteStream uploads.
pub fn uuid(seed: u64) -> String {
    let hex = garret_nix::Sha256Hash::of(&seed.to_be_bytes()).to_hex();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// A process's `/proc` entries: a server's (by pid), or this one's.
#[derive(Debug, Clone, Copy)]
pub struct Probe(pub u32);

impl Probe {
    pub fn own() -> Self {
        Self(std::process::id())
    }

    /// `(VmHWM, VmRSS)` in KiB; `None` once the process is gone or a zombie.
    pub fn memory_kib(self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        };
        let state = field("State:")?;
        if state.starts_with('Z') || state.starts_with('X') {
            return None;
        }
        Some((
            field("VmHWM:")?.parse().ok()?,
            field("VmRSS:")?.parse().ok()?,
        ))
    }

    /// `VmHWM` in KiB: the peak RSS since start or the last reset.
    pub fn peak_kib(self) -> Option<u64> {
        self.memory_kib().map(|(peak, _)| peak)
    }

    /// Resets `VmHWM` to the current RSS (Linux ≥ 4.0), so the next reading
    /// is the peak since now.
    pub fn reset_peak(self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.0), "5").is_ok()
    }

    /// User + system CPU seconds (clock ticks of 1/100 s, as on Linux).
    #[allow(clippy::cast_precision_loss, reason = "figures for humans")]
    pub fn cpu_secs(self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // After the command: state is field 3, utime 14 and stime 15.
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }
}

//! Content-defined chunking with FastCDC 2020.
//!
//! Parameters follow the REAPI split/splice convention (normalization level 2,
//! seed 0, min = avg/4, max = avg*4) so that `SplitBlob` can advertise the very
//! chunker the store uses: with the default 64 KiB average a Bazel client that
//! chunks the same way finds our chunks by digest.

use fastcdc::v2020::{self, MASKS, Normalization};
use thiserror::Error;

/// FastCDC normalization level; REAPI's `FastCdc2020Params` fixes it at 2.
pub const NORMALIZATION: Normalization = Normalization::Level2;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ChunkerConfigError {
    #[error("average chunk size {0} must be a power of two between 1 KiB and 4 MiB")]
    BadAverage(u32),
    #[error("chunk sizes must satisfy min <= avg <= max (got {min}/{avg}/{max})")]
    Unordered { min: u32, avg: u32, max: u32 },
    #[error("minimum chunk size {0} is outside FastCDC's range 64 B..1 MiB")]
    BadMinimum(u32),
    #[error("maximum chunk size {0} is outside FastCDC's range 1 KiB..16 MiB")]
    BadMaximum(u32),
}

/// Chunk size bounds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerConfig {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// XORed into the gear table; nonzero seeds make chunk boundaries private
    /// to one deployment, at the price of not matching other REAPI peers.
    pub seed: u64,
}

impl ChunkerConfig {
    /// The REAPI-compatible parameters for a given average size.
    pub fn from_average(avg_size: u32) -> Result<Self, ChunkerConfigError> {
        Self {
            min_size: avg_size / 4,
            avg_size,
            max_size: avg_size.saturating_mul(4),
            seed: 0,
        }
        .validated()
    }

    pub fn validated(self) -> Result<Self, ChunkerConfigError> {
        let Self {
            min_size: min,
            avg_size: avg,
            max_size: max,
            ..
        } = self;
        if !avg.is_power_of_two() || !(1024..=v2020::AVERAGE_MAX).contains(&avg) {
            return Err(ChunkerConfigError::BadAverage(avg));
        }
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            return Err(ChunkerConfigError::BadMinimum(min));
        }
        if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) {
            return Err(ChunkerConfigError::BadMaximum(max));
        }
        if min > avg || avg > max {
            return Err(ChunkerConfigError::Unordered { min, avg, max });
        }
        Ok(self)
    }
}

impl Default for ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB: Attic's sizes and REAPI's default average.
    fn default() -> Self {
        Self::from_average(64 * 1024).expect("default chunker parameters are valid")
    }
}

/// Finds cut points; build once and reuse, since the gear tables are 4 KiB.
#[derive(Debug, Clone)]
pub struct Chunker {
    config: ChunkerConfig,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl Chunker {
    pub fn new(config: ChunkerConfig) -> Self {
        let bits = config.avg_size.ilog2();
        let level = NORMALIZATION.bits();
        let (gear, gear_ls) = v2020::get_gear_with_seed(config.seed);
        Self {
            config,
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
            gear,
            gear_ls,
        }
    }

    pub fn config(&self) -> &ChunkerConfig {
        &self.config
    }

    /// Length of the first chunk of `data`.
    ///
    /// The answer only depends on the first `max_size` bytes, so a streaming
    /// caller that buffers at least `max_size` bytes (or all that is left at
    /// end of input) cuts exactly where a whole-buffer FastCDC run would.
    pub fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut_gear(
            data,
            self.config.min_size as usize,
            self.config.avg_size as usize,
            self.config.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        len
    }

    /// Bytes a streaming caller must buffer before calling [`Chunker::cut`].
    pub fn window(&self) -> usize {
        self.config.max_size as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_cuts_match_the_reference_chunker() {
        let data = crate::testing::text(3 << 20, 0x9e37_79b9_7f4a_7c15);
        let config = ChunkerConfig::default();
        let reference: Vec<usize> = v2020::FastCDC::with_level(
            &data,
            config.min_size,
            config.avg_size,
            config.max_size,
            NORMALIZATION,
        )
        .map(|c| c.length)
        .collect();

        let chunker = Chunker::new(config);
        let mut ours = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let window = &rest[..rest.len().min(chunker.window())];
            let len = chunker.cut(window);
            ours.push(len);
            rest = &rest[len..];
        }
        assert_eq!(ours, reference);
        assert!(ours.iter().all(|&l| l <= config.max_size as usize));
    }

    #[test]
    fn validates_parameters() {
        assert_eq!(
            ChunkerConfig::from_average(1000),
            Err(ChunkerConfigError::BadAverage(1000))
        );
        let bad = ChunkerConfig {
            min_size: 128 * 1024,
            ..ChunkerConfig::default()
        };
        assert!(matches!(
            bad.validated(),
            Err(ChunkerConfigError::Unordered { .. })
        ));
        assert_eq!(
            ChunkerConfig::default(),
            ChunkerConfig {
                min_size: 16384,
                avg_size: 65536,
                max_size: 262_144,
                seed: 0
            }
        );
    }
}

//! Per-chunk zstd frames.
//!
//! Every chunk is stored as exactly one zstd frame, so a blob is served to
//! zstd-capable clients as the plain concatenation of its stored objects (a
//! valid multi-frame zstd stream) without recompression. Incompressible data
//! costs nothing extra to speak of: zstd itself emits raw blocks when a block
//! does not shrink, which adds a few header bytes and decompresses at memcpy
//! speed. That is how "store raw when compression does not help" is met while
//! keeping every object a frame.

use std::cell::RefCell;

use bytes::Bytes;
use thiserror::Error;
use zstd::bulk::{Compressor, Decompressor};

/// Default level, chosen by measurement (see BENCHMARKS.md): level 3 keeps
/// compression near the network speed of one core while taking most of the
/// ratio that higher levels offer on NARs.
pub const DEFAULT_LEVEL: i32 = 3;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("zstd failed: {0}")]
    Zstd(#[from] std::io::Error),
    #[error("stored frame decompressed to {got} bytes, expected {expected}")]
    WrongLength { got: usize, expected: usize },
}

thread_local! {
    /// A zstd context per thread, reused: creating one per chunk was 5 % of
    /// a ByteStream read's server time (`ZSTD_createDCtx` in `perf`).
    static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

pub fn compress(data: &[u8], level: i32) -> Result<Bytes, CodecError> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some((at, compressor)) if *at == level => compressor,
            _ => &mut slot.insert((level, Compressor::new(level)?)).1,
        };
        Ok(compressor.compress(data)?.into())
    })
}

/// Decompresses one frame whose content size the manifest knows, rejecting
/// anything else: a frame of the wrong size means a corrupt object.
pub fn decompress(frame: &[u8], expected: usize) -> Result<Bytes, CodecError> {
    // One spare byte makes an oversized frame fail instead of fitting exactly.
    let out = DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(decompressor) => decompressor,
            None => slot.insert(Decompressor::new()?),
        };
        decompressor.decompress(frame, expected + 1)
    })?;
    if out.len() != expected {
        return Err(CodecError::WrongLength {
            got: out.len(),
            expected,
        });
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_length() {
        let data = b"hello hello hello hello hello".repeat(100);
        let frame = compress(&data, DEFAULT_LEVEL).unwrap();
        assert!(frame.len() < data.len());
        assert_eq!(decompress(&frame, data.len()).unwrap(), &data[..]);
        assert!(decompress(&frame, data.len() - 1).is_err());
        assert!(matches!(
            decompress(&frame, data.len() + 5),
            Err(CodecError::WrongLength { .. })
        ));
    }

    #[test]
    fn incompressible_data_costs_only_headers() {
        let mut state = 1u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                state.to_le_bytes()[3]
            })
            .collect();
        let frame = compress(&data, DEFAULT_LEVEL).unwrap();
        assert!(frame.len() <= data.len() + 32, "{}", frame.len());
    }

    #[test]
    fn concatenated_frames_are_one_stream() {
        let a = compress(b"first ", DEFAULT_LEVEL).unwrap();
        let b = compress(b"second", DEFAULT_LEVEL).unwrap();
        let joined = [a, b].concat();
        assert_eq!(
            zstd::stream::decode_all(&joined[..]).unwrap(),
            b"first second"
        );
    }
}

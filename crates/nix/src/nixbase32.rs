//! Nix's own base32 ("nix32"): a 32-letter alphabet without `e o u t`, written
//! least-significant bits last, so it is *not* RFC 4648 base32. Store path
//! hashes and `sha256:` narinfo hashes use it.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Reverse lookup table: byte -> 5-bit value, or `0xff` for bytes outside the alphabet.
const REVERSE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        // `i < 32`, so the cast cannot truncate (`TryFrom` is not const).
        #[allow(clippy::cast_possible_truncation)]
        let value = i as u8;
        table[ALPHABET[i] as usize] = value;
        i += 1;
    }
    table
};

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum Nix32Error {
    #[error("invalid nix32 character {0:?}")]
    InvalidCharacter(char),
    #[error("nix32 string has length {got}, expected {expected}")]
    InvalidLength { got: usize, expected: usize },
    #[error("nix32 string encodes bits beyond the decoded length")]
    TrailingBits,
}

/// Length of the nix32 encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// Number of bytes a nix32 string of `len` characters decodes to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let low = u16::from(input[i]) >> j;
        let high = input.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(input: &[u8]) -> Result<[u8; N], Nix32Error> {
    let expected = encoded_len(N);
    if input.len() != expected {
        return Err(Nix32Error::InvalidLength {
            got: input.len(),
            expected,
        });
    }
    let mut out = [0u8; N];
    decode_into(input, &mut out)?;
    Ok(out)
}

/// Decodes a nix32 string of any length.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, Nix32Error> {
    let mut out = vec![0u8; decoded_len(input.len())];
    if encoded_len(out.len()) != input.len() {
        return Err(Nix32Error::InvalidLength {
            got: input.len(),
            expected: encoded_len(out.len()),
        });
    }
    decode_into(input, &mut out)?;
    Ok(out)
}

fn decode_into(input: &[u8], out: &mut [u8]) -> Result<(), Nix32Error> {
    for (n, &c) in input.iter().rev().enumerate() {
        let digit = REVERSE[usize::from(c)];
        if digit == 0xff {
            return Err(Nix32Error::InvalidCharacter(char::from(c)));
        }
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        out[i] |= digit << j;
        let carry = u16::from(digit) >> (8 - j);
        if carry != 0 {
            // Like Nix: bits that fall past the last byte make the string invalid,
            // so every byte string has exactly one encoding.
            match out.get_mut(i + 1) {
                Some(next) => *next |= u8::try_from(carry).expect("carry fits in a byte"),
                None => return Err(Nix32Error::TrailingBits),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // sha256("") as Nix prints it with `nix-hash --type sha256 --to-base32`.
        let digest = data_encoding::HEXLOWER
            .decode(b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&digest),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(decode(b"0z").unwrap(), vec![0x1f]);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"0e"), Err(Nix32Error::InvalidCharacter('e')));
        // "z" in the top position of a 1-byte value sets bits past the byte.
        assert_eq!(decode(b"z0"), Err(Nix32Error::TrailingBits));
        assert_eq!(
            decode_fixed::<20>(b"abc"),
            Err(Nix32Error::InvalidLength {
                got: 3,
                expected: 32
            })
        );
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(text.as_bytes()).unwrap(), bytes);
        }
    }
}

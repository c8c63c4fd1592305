//! Typed 32-byte BLAKE3 identifiers, so a chunk id is never mistaken for a file hash.

use std::fmt;
use std::str::FromStr;

/// A string that is not 64 lowercase or uppercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 64-digit hex BLAKE3 hash: {0:?}")]
pub struct HexError(pub String);

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw hash bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
            /// The raw hash bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lowercase hex, 64 digits.
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }
            /// Parses 64 hex digits.
            pub fn from_hex(s: &str) -> Result<Self, HexError> {
                from_hex(s).map(Self).ok_or_else(|| HexError(s.chars().take(80).collect()))
            }
            /// Reads 32 raw bytes from a slice of exactly that length.
            pub fn from_slice(s: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(s).ok().map(Self)
            }
        }
        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }
        impl FromStr for $name {
            type Err = HexError;
            fn from_str(s: &str) -> Result<Self, HexError> {
                Self::from_hex(s)
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::from_hex(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

hash_id!(
    /// BLAKE3 of a whole file's bytes (equal to what `b3sum` prints).
    FileHash
);
hash_id!(
    /// BLAKE3 of one content-defined chunk's bytes.
    ChunkId
);
hash_id!(
    /// BLAKE3 (derive-key mode) of a manifest's canonical encoding.
    ContentRoot
);

fn to_hex(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let h = FileHash::from(blake3::hash(b"abc"));
        assert_eq!(h.to_hex(), blake3::hash(b"abc").to_hex().as_str());
        assert_eq!(FileHash::from_hex(&h.to_hex()).unwrap(), h);
        assert_eq!(FileHash::from_hex(&h.to_hex().to_uppercase()).unwrap(), h);
        assert!(FileHash::from_hex("00").is_err());
        assert!(FileHash::from_hex(&"g".repeat(64)).is_err());
        assert!(FileHash::from_hex(&"é".repeat(32)).is_err());
    }
}

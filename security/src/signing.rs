//! Real-time writers' record signatures.
//!
//! A hybrid store's real-time topic is open to whoever the broker lets write it; the controller
//! is what knows who may (`write` on the store). So a writer registers with the controller
//! first and receives a producer GUID and a secret of its own ([`generate_secret`]); it signs
//! every record it produces with HMAC-SHA256 over the record's value, carried in the record's
//! key ([`WriterSecret::sign`]), and a partition leader of a server with authorization on
//! copies a record only if its signature verifies with the secret registered for the GUID the
//! record names ([`WriterSecret::verifies`]). A record's value already carries its producer
//! metadata (GUID, segment, sequence), so a signed record cannot be replayed under another
//! writer's identity, and the leader's sequence checks refuse one replayed in place.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a writer's secret.
pub const SECRET_BYTES: usize = 32;
/// The first byte of a signed record's key: the signature's format.
pub const SIGNATURE_FORMAT: u8 = 1;
/// Length of a signed record's key: the format byte, then the HMAC-SHA256 tag.
pub const SIGNED_KEY_BYTES: usize = 1 + 32;

/// A secret that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("a writer's secret is {SECRET_BYTES} bytes (64 hexadecimal digits), not {0}")]
    Length(usize),
    #[error("a writer's secret is hexadecimal: {0}")]
    NotHex(String),
    #[error("the system's random number generator failed")]
    Random,
}

/// A fresh random secret for a writer being registered.
pub fn generate_secret() -> Result<[u8; SECRET_BYTES], SigningError> {
    let mut secret = [0u8; SECRET_BYTES];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| SigningError::Random)?;
    Ok(secret)
}

/// A secret as stored and sent: lowercase hexadecimal.
pub fn secret_hex(secret: &[u8]) -> String {
    secret.iter().map(|b| format!("{b:02x}")).collect()
}

/// One writer's signing key.
#[derive(Clone)]
pub struct WriterSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for WriterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterSecret(..)")
    }
}

impl WriterSecret {
    pub fn new(secret: &[u8]) -> Result<WriterSecret, SigningError> {
        if secret.len() != SECRET_BYTES {
            return Err(SigningError::Length(secret.len()));
        }
        Ok(WriterSecret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// Reads a secret written by [`secret_hex`].
    pub fn from_hex(text: &str) -> Result<WriterSecret, SigningError> {
        if text.len() != 2 * SECRET_BYTES {
            return Err(SigningError::Length(text.len() / 2));
        }
        let digit = |c: u8| {
            (c as char)
                .to_digit(16)
                .ok_or_else(|| SigningError::NotHex(format!("{:?} is not a digit", c as char)))
        };
        let bytes = text
            .as_bytes()
            .chunks(2)
            .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
            .collect::<Result<Vec<u8>, SigningError>>()?;
        WriterSecret::new(&bytes)
    }

    /// The key of a record whose value is `value`.
    pub fn sign(&self, value: &[u8]) -> [u8; SIGNED_KEY_BYTES] {
        let mut key = [0u8; SIGNED_KEY_BYTES];
        key[0] = SIGNATURE_FORMAT;
        key[1..].copy_from_slice(hmac::sign(&self.key, value).as_ref());
        key
    }

    /// Whether `key` is this secret's signature of `value` (compared in constant time).
    pub fn verifies(&self, value: &[u8], key: &[u8]) -> bool {
        match key {
            [SIGNATURE_FORMAT, tag @ ..] if tag.len() == SIGNED_KEY_BYTES - 1 => {
                hmac::verify(&self.key, value, tag).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_over_its_value() {
        let secret = generate_secret().unwrap();
        let writer = WriterSecret::from_hex(&secret_hex(&secret)).unwrap();
        let key = writer.sign(b"record");
        assert_eq!(key.len(), SIGNED_KEY_BYTES);
        assert!(writer.verifies(b"record", &key));
        assert!(!writer.verifies(b"recore", &key), "another value");
        let other = WriterSecret::new(&generate_secret().unwrap()).unwrap();
        assert!(!other.verifies(b"record", &key), "another writer's secret");
        let mut flipped = key;
        flipped[7] ^= 1;
        assert!(!writer.verifies(b"record", &flipped));
        assert!(!writer.verifies(b"record", &key[..32]), "cut short");
        assert!(!writer.verifies(b"record", &[]), "unsigned");
        let mut format = key;
        format[0] = 2;
        assert!(!writer.verifies(b"record", &format), "an unknown format");
    }

    #[test]
    fn the_key_is_the_format_byte_then_hmac_sha256() {
        // Expected from Python's `hmac` module (another implementation):
        // hmac.new(bytes(range(32)), b"what do ya want for nothing?", hashlib.sha256)
        let secret: Vec<u8> = (0..32).collect();
        let key = WriterSecret::new(&secret)
            .unwrap()
            .sign(b"what do ya want for nothing?");
        assert_eq!(key[0], SIGNATURE_FORMAT);
        assert_eq!(
            secret_hex(&key[1..]),
            "099805f4ac310786968565c098db515cc50862b420ae31e20238312344bed36a"
        );
        // A secret of the wrong length or not hexadecimal is refused.
        assert!(matches!(
            WriterSecret::new(&[0; 16]),
            Err(SigningError::Length(16))
        ));
        assert!(WriterSecret::from_hex(&"zz".repeat(SECRET_BYTES)).is_err());
        // Not ASCII: refused, not split inside a character.
        assert!(WriterSecret::from_hex(&"é".repeat(SECRET_BYTES)).is_err());
        let hex = secret_hex(&secret);
        assert_eq!(secret_hex(&secret), hex.to_lowercase());
        let again = WriterSecret::from_hex(&hex.to_uppercase()).unwrap();
        assert!(again.verifies(b"what do ya want for nothing?", &key));
    }
}

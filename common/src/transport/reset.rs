//! The QUIC stateless-reset key of a node, derived from its TLS private key.
//!
//! A QUIC endpoint that receives a packet for a connection it does not know (its process
//! restarted, so it lost every connection) may answer with a *stateless reset*: a packet ending
//! in a token `HMAC(reset key, connection id)` that the peer learned when the connection was
//! set up. The peer then closes that connection at once instead of waiting for its idle timeout.
//! quinn picks a random reset key per endpoint by default, so a restarted process cannot produce
//! its predecessor's tokens. Deriving the key from the node's private key (HKDF-SHA256 with a
//! fixed label) gives every process of one node the same key: a restarted node resets its
//! peers' connections to the dead process on their next packet (a keep-alive, a probe, a push).
//!
//! A restarted process must also accept its predecessor's connection ids as plausible: quinn's
//! default generator embeds a keyed hash in each id and silently drops packets whose id fails
//! it, with a random key per process, so the new process would never answer. [`RandomCids`]
//! generates purely random ids, which quinn cannot pre-filter, so every short-header packet for
//! an unknown connection draws a reset (quinn rate-limits resets, 20 ms apart by default, and
//! answers only packets larger than the reset, so this amplifies nothing).
//!
//! The key is as secret as the private key it comes from (HKDF is one-way), and whoever holds
//! that key can impersonate the node anyway. A node whose key was renewed gets a new reset key;
//! connections to its previous process then end by idle timeout, as without this module.
//!
//! It must not: hold or expose the private key itself.

use std::time::Duration;

use quinn::crypto::{CryptoError, HmacKey};
use quinn::{ConnectionId, ConnectionIdGenerator};
use rustls::crypto::tls13::{Hkdf, OkmBlock};

/// HKDF salt: names what the key is for, so it can never equal a key derived for another use.
const RESET_KEY_SALT: &[u8] = b"strata/1 quic stateless reset";

/// HKDF info: the version of this derivation (change it to rotate every node's reset key).
const RESET_KEY_INFO: &[u8] = b"v1";

/// HMAC-SHA256 with a key derived from the node's private key; see the module doc.
pub(crate) struct ResetKey {
    /// rustls' HKDF over ring's HMAC-SHA256 (the crate has no direct ring dependency).
    hkdf: &'static dyn Hkdf,
    /// The derived HMAC key.
    key: OkmBlock,
}

impl ResetKey {
    /// Derives the key from the DER bytes of a private key. Deterministic: the same private key
    /// always gives the same reset key.
    pub(crate) fn derive(private_key_der: &[u8]) -> Self {
        let hkdf = sha256_hkdf();
        let key = hkdf
            .extract_from_secret(Some(RESET_KEY_SALT), private_key_der)
            .expand_block(&[RESET_KEY_INFO]);
        Self { hkdf, key }
    }
}

/// The HKDF-SHA256 of the ring provider (every TLS 1.3 SHA-256 suite carries it).
fn sha256_hkdf() -> &'static dyn Hkdf {
    match rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256 {
        rustls::SupportedCipherSuite::Tls13(suite) => suite.hkdf_provider,
        // The constant is a TLS 1.3 suite by definition; this arm only satisfies the type.
        _ => unreachable!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite"),
    }
}

impl HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        let n = signature_out.len().min(tag.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        // SHA-256.
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        if signature.len() != tag.len() {
            return Err(CryptoError);
        }
        // Constant time: fold every byte difference before deciding.
        let diff = tag
            .iter()
            .zip(signature)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 { Ok(()) } else { Err(CryptoError) }
    }
}

/// Length of our connection ids, in bytes: quinn's default, ample entropy for a node's
/// connections.
const CID_LEN_BYTES: usize = 8;

/// Random connection ids that every process of a node accepts as possibly its own (see the
/// module doc).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RandomCids;

impl ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&rand::random::<[u8; CID_LEN_BYTES]>())
    }

    fn cid_len(&self) -> usize {
        CID_LEN_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &ResetKey, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0; key.signature_len()];
        key.sign(data, &mut out);
        out
    }

    #[test]
    fn the_same_private_key_gives_the_same_tokens_and_another_key_different_ones() {
        let a = ResetKey::derive(b"private key a");
        let a_again = ResetKey::derive(b"private key a");
        let b = ResetKey::derive(b"private key b");
        let cid = b"connection id 1";
        assert_eq!(sign(&a, cid), sign(&a_again, cid));
        assert_ne!(sign(&a, cid), sign(&b, cid));
        assert_ne!(sign(&a, cid), sign(&a, b"connection id 2"));
        assert!(sign(&a, cid).iter().any(|&byte| byte != 0));
    }

    #[test]
    fn verify_accepts_its_own_signature_and_refuses_any_other() {
        let key = ResetKey::derive(b"private key");
        let mut signature = sign(&key, b"data");
        assert!(key.verify(b"data", &signature).is_ok());
        assert!(key.verify(b"other data", &signature).is_err());
        assert!(key.verify(b"data", &signature[..16]).is_err());
        signature[0] ^= 1;
        assert!(key.verify(b"data", &signature).is_err());
    }
}

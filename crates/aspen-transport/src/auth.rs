//! Proofs that a peer holds the cluster secret, and client token checks.
//!
//! A proof is `blake3::keyed_hash(derive_key(secret), endpoint_id)`: it binds the secret to
//! the sender's endpoint id, which the QUIC handshake authenticates, so a proof seen on the
//! wire is useless to any other identity and the secret itself is never sent.

use iroh::EndpointId;

const PROOF_CONTEXT: &str = "aspen 2026-11 cluster secret proof v1";
const TOKEN_CONTEXT: &str = "aspen 2026-11 client token compare v1";

/// The proof `endpoint` presents to show it holds `secret`.
pub fn cluster_proof(secret: &str, endpoint: &EndpointId) -> [u8; 32] {
    let key = blake3::derive_key(PROOF_CONTEXT, secret.as_bytes());
    *blake3::keyed_hash(&key, endpoint.as_bytes()).as_bytes()
}

/// Whether `proof` shows that `endpoint` holds `secret` (constant-time comparison).
pub fn verify_cluster_proof(secret: &str, endpoint: &EndpointId, proof: &[u8; 32]) -> bool {
    blake3::Hash::from(cluster_proof(secret, endpoint)) == blake3::Hash::from(*proof)
}

/// Compares a presented client token with the configured one in constant time.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    let hash = |token: &str| blake3::derive_key(TOKEN_CONTEXT, token.as_bytes());
    blake3::Hash::from(hash(expected)) == blake3::Hash::from(hash(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_and_identity() {
        let alice = iroh::SecretKey::from_bytes(&[1; 32]).public();
        let bob = iroh::SecretKey::from_bytes(&[2; 32]).public();
        let proof = cluster_proof("s3cret", &alice);
        assert!(verify_cluster_proof("s3cret", &alice, &proof));
        assert!(!verify_cluster_proof("wrong", &alice, &proof));
        assert!(!verify_cluster_proof("s3cret", &bob, &proof), "a proof is not transferable");
        assert!(token_matches("t", "t"));
        assert!(!token_matches("t", "u"));
    }
}

//! Block keys computed from token ids: the keys the vLLM connector saves a prompt's blocks under,
//! and the keys a router or gateway computes from a request to find them. They depend only on
//! the tokens, the block size and the per-block extra keys (LoRA adapter, cache salt, multimodal
//! items), never on the engine's own hash algorithm or `PYTHONHASHSEED`.
//!
//! Key of block `i` (tokens `t[i*B .. (i+1)*B]`, full blocks only):
//!
//! ```text
//! key_i = SHA-256( "kvtier.block.v1\0" || key_{i-1} (32 bytes; 32 zero bytes for i = 0)
//!                  || u32le(B) || t as u32le... || extras_i )
//! ```
//!
//! `extras_i` encodes vLLM's extra keys for the block (`generate_block_hash_extra_keys`): absent
//! as `u32le(0)`, else `u32le(count)` then each item tagged: `s` + u32le(len) + UTF-8 for a
//! string, `b` + u32le(len) + bytes, `i` + i64le for an integer, `t` + u32le(count) + items for
//! a tuple. `docs/keying.md` has the worked example the connector's test checks against.

use crate::block::BlockHash;
use sha2::{Digest, Sha256};

/// Domain separation: a key of this scheme never equals a hash of another.
const DOMAIN: &[u8] = b"kvtier.block.v1\0";

/// One item of a block's extra keys, as vLLM builds them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Extra {
    /// A string (an adapter name, a salt, a multimodal identifier).
    Str(String),
    /// Raw bytes (a prompt-embedding digest).
    Bytes(Vec<u8>),
    /// An integer (a multimodal item's offset).
    Int(i64),
    /// A tuple of items.
    Tuple(Vec<Extra>),
}

impl Extra {
    /// The extra key vLLM gives the first block of a request with a `cache_salt`.
    pub fn cache_salt(salt: &str) -> Self {
        Extra::Tuple(vec![Extra::Str("cache_salt".into()), Extra::Str(salt.into())])
    }

    /// The extra key vLLM gives every block of a request for LoRA adapter `name` loaded from
    /// `path` (both go in: re-pointing a name at another adapter changes the keys).
    pub fn lora(name: &str, path: &str) -> Self {
        Extra::Tuple(vec![Extra::Str("lora".into()), Extra::Str(name.into()), Extra::Str(path.into())])
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let len = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as u32).to_le_bytes());
        match self {
            Extra::Str(s) => {
                out.push(b's');
                len(out, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Extra::Bytes(b) => {
                out.push(b'b');
                len(out, b.len());
                out.extend_from_slice(b);
            }
            Extra::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(&i.to_le_bytes());
            }
            Extra::Tuple(items) => {
                out.push(b't');
                len(out, items.len());
                items.iter().for_each(|e| e.encode(out));
            }
        }
    }
}

/// The key of one block from its parent's key (`None` for the first block), its tokens and its
/// extra keys.
pub fn block_key(parent: Option<&[u8; 32]>, tokens: &[u32], extras: &[Extra]) -> [u8; 32] {
    let mut buf = Vec::with_capacity(DOMAIN.len() + 40 + tokens.len() * 4 + 8);
    buf.extend_from_slice(DOMAIN);
    buf.extend_from_slice(parent.unwrap_or(&[0; 32]));
    buf.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    buf.extend_from_slice(&(extras.len() as u32).to_le_bytes());
    extras.iter().for_each(|e| e.encode(&mut buf));
    Sha256::digest(&buf).into()
}

/// The keys of every full block of `tokens` (`block_size` tokens each), chained; `extras(i)`
/// gives block `i`'s extra keys. A `block_size` of 0 gives no keys.
pub fn block_keys(tokens: &[u32], block_size: usize, mut extras: impl FnMut(usize) -> Vec<Extra>) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent: Option<[u8; 32]> = None;
    tokens
        .chunks_exact(block_size)
        .enumerate()
        .map(|(i, block)| {
            let key = block_key(parent.as_ref(), block, &extras(i));
            parent = Some(key);
            BlockHash::new(&key).expect("32 bytes is a valid hash")
        })
        .collect()
}

/// The keys of a plain request (no adapter, no multimodal items): the salt, if any, on the
/// first block, as vLLM adds it.
pub fn request_keys(tokens: &[u32], block_size: usize, cache_salt: &str) -> Vec<BlockHash> {
    adapter_request_keys(tokens, block_size, cache_salt, None)
}

/// The keys of a request for LoRA adapter `lora` (`Extra::lora`, None for the base model):
/// the adapter on every block, then the salt, if any, on the first, in vLLM's order.
pub fn adapter_request_keys(
    tokens: &[u32],
    block_size: usize,
    cache_salt: &str,
    lora: Option<&Extra>,
) -> Vec<BlockHash> {
    block_keys(tokens, block_size, |i| {
        let mut extras: Vec<Extra> = lora.into_iter().cloned().collect();
        if i == 0 && !cache_salt.is_empty() {
            extras.push(Extra::cache_salt(cache_salt));
        }
        extras
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn only_full_blocks_are_keyed_and_keys_chain() {
        let tokens: Vec<u32> = (0..10).collect();
        let k = request_keys(&tokens, 4, "");
        assert_eq!(k.len(), 2);
        let again = request_keys(&tokens[..8], 4, "");
        assert_eq!(k, again, "a prefix has the same keys");
        let mut other = tokens.clone();
        other[1] = 99;
        let changed = request_keys(&other, 4, "");
        assert_ne!(k[0], changed[0]);
        assert_ne!(k[1], changed[1], "a changed earlier block changes every later key");
        assert!(request_keys(&tokens, 0, "").is_empty());
        assert!(request_keys(&tokens[..3], 4, "").is_empty());
    }

    #[test]
    fn the_salt_changes_every_key_through_the_chain() {
        let tokens: Vec<u32> = (0..8).collect();
        let plain = request_keys(&tokens, 4, "");
        let salted = request_keys(&tokens, 4, "tenant-a");
        assert_ne!(plain[0], salted[0]);
        assert_ne!(plain[1], salted[1]);
        assert_ne!(salted, request_keys(&tokens, 4, "tenant-b"));
    }

    #[test]
    fn an_adapter_keys_every_block_before_the_salt_as_vllm_orders_them() {
        let tokens: Vec<u32> = (0..8).collect();
        let lora = Extra::lora("ad", "/adapters/ad");
        let keys = adapter_request_keys(&tokens, 4, "t", Some(&lora));
        let first = block_key(None, &tokens[..4], &[lora.clone(), Extra::cache_salt("t")]);
        assert_eq!(keys[0].as_bytes(), &first);
        assert_eq!(keys[1].as_bytes(), &block_key(Some(&first), &tokens[4..], &[lora]));
        let moved = adapter_request_keys(&tokens, 4, "t", Some(&Extra::lora("ad", "/elsewhere")));
        assert!(keys.iter().zip(&moved).all(|(a, b)| a != b), "the adapter's path is part of every key");
        assert_eq!(adapter_request_keys(&tokens, 4, "t", None), request_keys(&tokens, 4, "t"));
    }

    #[test]
    fn extras_are_unambiguous() {
        let t = [1u32, 2];
        let a = block_key(None, &t, &[Extra::Str("ab".into()), Extra::Str("c".into())]);
        let b = block_key(None, &t, &[Extra::Str("a".into()), Extra::Str("bc".into())]);
        let c = block_key(None, &t, &[Extra::Tuple(vec![Extra::Str("ab".into()), Extra::Str("c".into())])]);
        let d = block_key(None, &t, &[Extra::Bytes(b"ab".to_vec()), Extra::Str("c".into())]);
        assert!(a != b && a != c && a != d && b != c && c != d);
        assert_ne!(block_key(None, &t, &[]), block_key(None, &[1, 2, 0], &[]));
    }

    /// The worked example of docs/keying.md; the Python connector's test checks the same values.
    #[test]
    fn worked_example() {
        let tokens: Vec<u32> = (1..=8).collect();
        let keys = request_keys(&tokens, 4, "s");
        assert_eq!(hex(keys[0].as_bytes()), "fabe646c0966eced682653d2d50f49c943f68c0b5a99fec15d8d72140edaa844");
        assert_eq!(hex(keys[1].as_bytes()), "ae73c27f80d01ace09aee63cca88114af4e4ace7290c8eb3bca461e420f704bd");
        let s = |x: &str| Extra::Str(x.into());
        let extras = [
            Extra::Tuple(vec![s("lora"), s("a"), s("/p")]),
            Extra::Tuple(vec![s("mm"), Extra::Int(3)]),
            Extra::Bytes(b"xy".to_vec()),
        ];
        assert_eq!(
            hex(&block_key(None, &[1, 2], &extras)),
            "8b3ea568a9192e520059c84525791bcb12c4b31e33a69c8b58a3a9a56a830f38"
        );
    }
}
